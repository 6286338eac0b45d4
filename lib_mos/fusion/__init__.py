"""Gradient fusion: the stages (`pipeline`), the exact least-squares solver (`solver`), the
per-concept report (`report`), the child process the tab runs (`process`) and the fused
checkpoint file (`checkpoint`)."""
