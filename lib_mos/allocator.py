"""Giving freed memory back to the system on glibc.

glibc serves blocks under its mmap threshold (a checkpoint's many small tensors) from its heap and
keeps them when they are freed: a process that drops a 5 GB UNet still shows 5 GB resident, and
memory budgets (fusion, training on the CPU) count resident memory. `trim` returns every free page
of the heap (milliseconds); elsewhere it does nothing.
"""

from __future__ import annotations

from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, where the C library has it (Linux with glibc), else None."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim() -> None:
    """Return the heap's free pages to the system (glibc); no-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
