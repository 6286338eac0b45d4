"""File hashes (modules/hashes.py): sha256 of a file, kohya's "addnet" hash of a safetensors file
(the sha256 of everything after the header), and the hash cache keyed by a title such as
`checkpoint/<name>` or `lora/<name>`, valid while the file's mtime is not newer.

The host keeps that cache in `<data dir>/cache.json`; the double keeps it in memory, one per data
folder, so a fresh data folder starts with nothing hashed, as a fresh install does.
"""

from __future__ import annotations

import hashlib
import os

from modules import paths, shared

_caches: dict[tuple[str, str], dict[str, dict]] = {}


def cache(subsection: str) -> dict[str, dict]:
    return _caches.setdefault((paths.data_path, subsection), {})


def calculate_sha256(filename: str) -> str:
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def addnet_hash_safetensors(b) -> str:
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for block in iter(lambda: b.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def sha256_from_cache(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    try:
        mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    entry = hashes.get(title)
    if entry is None or entry.get("sha256") is None or mtime > entry.get("mtime", 0):
        return None
    return entry["sha256"]


def sha256(filename: str, title: str, use_addnet_hash: bool = False) -> str | None:
    value = sha256_from_cache(filename, title, use_addnet_hash)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    if use_addnet_hash:
        with open(filename, "rb") as f:
            value = addnet_hash_safetensors(f)
    else:
        value = calculate_sha256(filename)
    hashes = cache("hashes-addnet") if use_addnet_hash else cache("hashes")
    hashes[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    return value
