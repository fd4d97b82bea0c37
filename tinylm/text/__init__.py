"""Text: tokenizer, special-token safety, chat templates (tools, thinking, images)."""
