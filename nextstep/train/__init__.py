"""Training: tokenizer and autoregressive trainers, distributed wrapping, resumable state."""
