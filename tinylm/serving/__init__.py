"""Serving: the OpenAI-compatible server (chat, completions, tool calls)."""
