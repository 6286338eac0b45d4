"""Replacing a function of a module or class (modules/patches.py): one patch per (caller key, object,
field); patching twice raises, undoing an absent patch raises."""

from __future__ import annotations

from collections import defaultdict

originals: defaultdict[str, dict] = defaultdict(dict)


def patch(key, obj, field, replacement):
    """Set `obj.field` to `replacement`; returns the original."""
    if (obj, field) in originals[key]:
        raise RuntimeError(f"patch for {field} is already applied")
    original_func = getattr(obj, field)
    originals[key][(obj, field)] = original_func
    setattr(obj, field, replacement)
    return original_func


def undo(key, obj, field):
    if (obj, field) not in originals[key]:
        raise RuntimeError(f"there is no patch for {field} to undo")
    setattr(obj, field, originals[key].pop((obj, field)))


def original(key, obj, field):
    return originals[key].get((obj, field), None)
