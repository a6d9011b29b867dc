"""task=serve: an OpenAI-compatible HTTP server over a continuously batched decode loop."""
