"""Forge's `modules_forge` package: here only its presence, one of Forge's markers."""
