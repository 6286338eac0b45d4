"""The SD1.5 CLIP tokenizer (openai/clip-vit-large-patch14), built offline.

Tests and tools outside the WebUI cannot download the tokenizer, but its whole content is the BPE
vocabulary that the `clip-anytorch` wheel ships as `clip/bpe_simple_vocab_16e6.txt.gz`. From it we
write the two files transformers' CLIPTokenizer reads (vocab.json, merges.txt) into a cache folder
once, then load from there.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MAX_LENGTH",
    "N_MERGES",
    "VOCAB_SIZE",
    "default_cache_dir",
    "find_vocab_file",
    "load_clip_tokenizer",
]

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# 49408 = 2 * 256 byte symbols + merges + 2 special tokens.
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
MAX_LENGTH = 77
_CACHE_NAME = "clip-vit-large-patch14-tokenizer"
# Written last into the temp folder: its presence marks a complete build (for folders from
# older/foreign writers that did not use the atomic rename).
_DONE_MARKER = "lib_mos_complete"
_TOKENIZER_CONFIG = {
    "model_max_length": MAX_LENGTH,
    "do_lower_case": True,
    "errors": "replace",
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "add_prefix_space": False,
    "tokenizer_class": "CLIPTokenizer",
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table, in vocabulary order.

    Printable bytes map to themselves; the rest are shifted above U+0100 so that BPE never sees
    whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in codes]


def default_cache_dir() -> Path:
    """Where the built tokenizer lives: `$MOS_CACHE_DIR/<name>` or `~/.cache/lib_mos/<name>`."""
    root = os.environ.get("MOS_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lib_mos"
    return base / _CACHE_NAME


def find_vocab_file(vocab_path: str | os.PathLike[str] | None = None) -> Path:
    """Locate the BPE vocabulary: explicit argument, then `$MOS_CLIP_VOCAB`, then the clip-anytorch wheel.

    The `clip` package is only located, never imported: importing it pulls torchvision and more.
    """
    if vocab_path is not None:
        candidate, origin = Path(vocab_path).expanduser(), "the vocab_path argument"
    elif os.environ.get("MOS_CLIP_VOCAB"):
        candidate, origin = Path(os.environ["MOS_CLIP_VOCAB"]).expanduser(), "$MOS_CLIP_VOCAB"
    else:
        spec = importlib.util.find_spec("clip")
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        if not folders:
            raise FileNotFoundError(
                f"CLIP BPE vocabulary not found: package 'clip' (pip install --no-deps clip-anytorch) is not "
                f"installed; alternatively set MOS_CLIP_VOCAB to the path of {VOCAB_FILE_NAME}"
            )
        candidate, origin = Path(folders[0]) / VOCAB_FILE_NAME, "the clip-anytorch package"
    if not candidate.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary file from {origin} does not exist: {candidate}")
    return candidate


def _read_merges(vocab_file: Path) -> list[str]:
    """The first N_MERGES merge rules ("a b" lines) of the gz file, as CLIP itself truncates them."""
    try:
        with gzip.open(vocab_file, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read CLIP BPE vocabulary {vocab_file}: {exc}") from exc
    merges = lines[1 : N_MERGES + 1]  # line 0 is a "#version" header
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{vocab_file} is not a CLIP BPE vocabulary (expected {N_MERGES} 'a b' merge lines)")
    return merges


def _write_tokenizer_files(vocab_file: Path, folder: Path) -> None:
    """Write vocab.json / merges.txt / tokenizer_config.json in the layout of openai/clip-vit-large-patch14."""
    merges = _read_merges(vocab_file)
    symbols = _bytes_to_unicode()
    tokens = [
        *symbols,
        *(s + "</w>" for s in symbols),
        *(m.replace(" ", "") for m in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{vocab_file}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (folder / _DONE_MARKER).write_text(str(vocab_file), encoding="utf-8")


def _ensure_cache(vocab_file: Path, cache_dir: Path) -> Path:
    """Build the tokenizer folder unless a complete one exists; publish it with one atomic rename.

    Concurrent builders each write a private temp folder; the first rename wins and the others
    discard theirs, so no reader ever sees a partial folder.
    """
    if (cache_dir / _DONE_MARKER).is_file():
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", suffix=".tmp", dir=cache_dir.parent))
    try:
        _write_tokenizer_files(vocab_file, tmp)
        if cache_dir.exists() and not (cache_dir / _DONE_MARKER).is_file():
            # Left by something else (or by hand) without our marker: replace it.
            shutil.rmtree(cache_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rename(tmp, cache_dir)
        if not (cache_dir / _DONE_MARKER).is_file():
            raise OSError(f"could not publish the CLIP tokenizer cache at {cache_dir}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


@functools.lru_cache(maxsize=4)
def _load_cached(vocab_file: str, cache_dir: str) -> CLIPTokenizer:
    """Build once per (vocabulary, cache folder) and process."""
    from transformers import CLIPTokenizer

    folder = _ensure_cache(Path(vocab_file), Path(cache_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, pad_token=EOS_TOKEN)
    if len(tokenizer) != VOCAB_SIZE or tokenizer.bos_token_id != VOCAB_SIZE - 2:
        raise ValueError(f"CLIP tokenizer cache {folder} is inconsistent (size {len(tokenizer)}); delete it")
    return tokenizer


def load_clip_tokenizer(
    vocab_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CLIPTokenizer:
    """Return SD1.5's CLIP tokenizer without network access (one shared instance per process).

    The instance is shared: code that adds tokens to it (e.g. concept tokens) must work on a
    `copy.deepcopy` so other users of the cache are not affected.
    """
    vocab_file = find_vocab_file(vocab_path)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _load_cached(str(vocab_file.resolve()), str(folder.resolve()))
