"""Scripts that run inside the vLLM engine environment, never inside Lorry's own environment."""
