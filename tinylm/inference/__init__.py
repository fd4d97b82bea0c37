"""Inference: sampling, batching engine, fast decode, speculative decoding, chat, tools."""
