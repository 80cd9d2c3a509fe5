"""Lorry: an OpenAI-compatible gateway that publishes LoRA adapters at their own subdomain."""

__version__ = "0.1.0"
