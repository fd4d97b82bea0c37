"""Data: formats, cleaning, tokenization into memory-mapped shards, datasets."""
