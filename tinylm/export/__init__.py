"""Export and interop: transformers, GGUF / llama.cpp, Ollama, hub downloads."""
