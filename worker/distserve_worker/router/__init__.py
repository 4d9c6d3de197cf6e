"""The OpenAI-compatible HTTP front: validates, tokenizes, picks instances, streams tokens back."""
