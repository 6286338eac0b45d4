"""Forge's `backend` package (the double: text processing and a model engine)."""
