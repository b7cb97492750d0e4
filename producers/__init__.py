"""Producers: the Python SDK, `umcd submit` and the HTTP upload gateway (no torch, no faiss)."""
