"""Models: config, the decoder (dense / MoE / MLA / MTP), KV cache, adapters, loading."""
