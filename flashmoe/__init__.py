"""flashmoe: stream a mixture-of-experts model's routed experts from SSD, token by token."""

__version__ = "0.1.0"
