"""A folder of concept files (the WebUI's models/Lora) as a token -> concept lookup.

Generation needs to know, every time, which concept file defines a token a prompt mentions, and
which tokens exist at all (to say so when one is mistyped). Scanning reads only what it must: the
metadata header of each `.safetensors` (ordinary LoRAs are skipped at that point) and, for the
authors' `.pth`/`.pt`, the file itself. Everything read is remembered per (size, mtime), so a
folder of hundreds of LoRAs costs a directory listing per generation once it has been seen.

A file that cannot be read is not skipped silently: it is listed in `Scan.problems` with the
reason, and callers show it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lib_mos.concepts.concept import Concept, ConceptError
from lib_mos.concepts.files import METADATA_KEY, family_of_file, read_concept, sha256_file, torch_load_weights
from lib_mos.models.family import SD1, ModelFamily

__all__ = ["LORA_SUFFIXES", "ConceptLibrary", "FoundConcepts", "LibraryEntry", "Scan", "lora_files", "lora_hash",
           "resolve"]

_TORCH_SUFFIXES = (".pth", ".pt")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what the host's Lora lists as networks
_LISTED = 24  # tokens named in a message before "and N more"


@dataclass(frozen=True)
class LibraryEntry:
    """One concept file: its tokens, and whether the host's Lora can apply its weights."""

    path: Path
    tokens: tuple[str, ...]
    authors_format: bool  # the authors' .pth: the WebUI's Lora cannot apply it (convert it first)


@dataclass
class Scan:
    folder: Path
    entries: list[LibraryEntry] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)

    def by_token(self) -> dict[str, LibraryEntry]:
        """token -> the entry defining it; the first file in path order wins, as listed."""
        found: dict[str, LibraryEntry] = {}
        for entry in self.entries:
            for token in entry.tokens:
                found.setdefault(token, entry)
        return found

    def problem_text(self) -> str:
        """One line naming every unreadable file and why, or ''."""
        if not self.problems:
            return ""
        return "; ".join(f"{_relative(p, self.folder)}: {why}" for p, why in self.problems)


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _tokens_of(path: Path) -> tuple[tuple[str, ...], bool] | None:
    """(tokens, authors' format) of a concept file, None for a file that is no concept (an ordinary
    LoRA, a non-ED-LoRA pickle). Raises ConceptError for a file that cannot be read."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get(METADATA_KEY)
        except BaseException as e:  # safetensors raises pyo3 panics (BaseException) on garbage
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ConceptError(f"{path}: unreadable .safetensors header ({type(e).__name__}: {e})") from None
        if meta is None:
            return None
        try:
            tokens = tuple(json.loads(meta)["tokens"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConceptError(f"{path}: broken {METADATA_KEY!r} metadata ({type(e).__name__}: {e})") from None
        return tokens, False
    obj = torch_load_weights(path)
    params = obj.get("params", obj) if isinstance(obj, Mapping) else None
    if not isinstance(params, Mapping) or "new_concept_embedding" not in params:
        return None
    return tuple(read_concept(path).tokens), True


class ConceptLibrary:
    """Scans folders of concept files; remembers what it read per file (size, mtime)."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int], LibraryEntry | str | None]] = {}
        self._concepts: dict[Path, tuple[tuple[int, int], Concept]] = {}
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        self._loras: dict[Path, tuple[tuple[int, int, str], Concept]] = {}
        self._families: dict[Path, tuple[tuple[int, int], ModelFamily | None]] = {}

    def scan(self, folder: str | os.PathLike[str]) -> Scan:
        root = Path(folder)
        scan = Scan(root)
        if not root.is_dir():
            return scan
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() not in (".safetensors", *_TORCH_SUFFIXES) or not path.is_file():
                continue
            try:
                key = _stat_key(path)
            except OSError as e:
                scan.problems.append((path, str(e)))
                continue
            cached = self._seen.get(path)
            if cached is None or cached[0] != key:
                try:
                    found = _tokens_of(path)
                    value: LibraryEntry | str | None = None if found is None else LibraryEntry(path, *found)
                except ConceptError as e:
                    value = str(e).removeprefix(f"{path}: ")
                self._seen[path] = cached = (key, value)
            value = cached[1]
            if isinstance(value, LibraryEntry):
                scan.entries.append(value)
            elif isinstance(value, str):
                scan.problems.append((path, value))
        return scan

    def concept(self, entry: LibraryEntry) -> Concept:
        """The whole concept of an entry, for the model family the file says it is for (read once
        per file version); whoever binds it refuses it for a model of another family."""
        key = _stat_key(entry.path)
        cached = self._concepts.get(entry.path)
        if cached is None or cached[0] != key:
            family = self.family(entry.path) or SD1
            cached = self._concepts[entry.path] = (key, read_concept(entry.path, family=family))
        return cached[1]

    def lora(self, path: str | os.PathLike[str], family: ModelFamily = SD1) -> Concept:
        """Any LoRA file read for its weights (trigger words optional) for a `family` model, once per
        file version and family."""
        path = Path(path)
        key = (*_stat_key(path), family.name)
        cached = self._loras.get(path)
        if cached is None or cached[0] != key:
            cached = self._loras[path] = (key, read_concept(path, trigger="", family=family))
        return cached[1]

    def family(self, path: str | os.PathLike[str]) -> ModelFamily | None:
        """The model family a LoRA file is for (`files.family_of_file`), once per file version;
        None for a file that says it is for another model (SD2) or cannot be read."""
        path = Path(path)
        key = _stat_key(path)
        cached = self._families.get(path)
        if cached is None or cached[0] != key:
            try:
                family = family_of_file(path)
            except ConceptError:
                family = None
            cached = self._families[path] = (key, family)
        return cached[1]

    def short_hash(self, path: str | os.PathLike[str]) -> str:
        """The hash the WebUI's Lora shows for this file in "Lora hashes" (`lora_hash`), 12 digits."""
        path = Path(path)
        key = _stat_key(path)
        cached = self._hashes.get(path)
        if cached is None or cached[0] != key:
            cached = self._hashes[path] = (key, lora_hash(path)[:12])
        return cached[1]


def lora_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of a `.safetensors` file's tensor data, after its JSON header (kohya's "addnet" hash,
    which the WebUI's Lora uses, so editing metadata does not change it); of the whole file for
    other formats."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def lora_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Every LoRA file in `folder` and its subfolders by the name `<lora:name>` uses (the file's
    stem, as the host names networks), sorted by name; of two files with one name, the first in
    path order."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


@dataclass
class FoundConcepts:
    """The concepts a generation binds, where each came from (for the infotext), and what the
    user should read in the console."""

    concepts: list[Concept] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # token -> the concept file defining it (not fused)

    def infotext(self) -> str:
        return "; ".join(self.sources)


def _listing(tokens: list[str]) -> str:
    if not tokens:
        return "none"
    shown = ", ".join(tokens[:_LISTED])
    return shown + (f" and {len(tokens) - _LISTED} more" if len(tokens) > _LISTED else "")


def resolve(wanted: set[str], fused: list[Concept], library: ConceptLibrary, folder: str | os.PathLike[str], *,
            strict: bool) -> FoundConcepts:
    """The concepts defining the `wanted` tokens: those of the loaded (fused) checkpoint first, then
    concept files in `folder`.

    A token nobody defines, or one only an authors' `.pth` defines (the WebUI's Lora cannot apply
    its weights), is a ConceptError when `strict` (the user chose Mix-of-Show for this generation),
    naming every token that does exist and every unreadable file; otherwise it is a warning and the
    token stays in the prompt as plain text, because other extensions write `<...>` too."""
    found = FoundConcepts()
    have: set[str] = set()
    for concept in fused:
        if set(concept.tokens) & wanted and not set(concept.tokens) & have:
            found.concepts.append(concept)
            found.sources.append(f"{' '.join(concept.tokens)} from the checkpoint")
            have.update(concept.tokens)
    scan = library.scan(folder)
    errors: list[str] = []
    for token, entry in scan.by_token().items():
        if token not in wanted or token in have:
            continue
        have.add(token)
        if entry.authors_format:
            errors.append(f"{token} is defined by {entry.path.name}, an authors' ED-LoRA file whose LoRA the WebUI "
                          f"cannot apply: convert it (python -m lib_mos convert {entry.path.name} "
                          f"{entry.path.stem}.safetensors)")
            continue
        concept = library.concept(entry)
        found.concepts.append(concept)
        found.sources.append(f"{' '.join(concept.tokens)} from {entry.path.name}@{library.short_hash(entry.path)}")
        found.files.update(dict.fromkeys(concept.tokens, entry.path))
        have.update(concept.tokens)
    unknown = sorted(wanted - have)
    if unknown:
        known = sorted({t for c in fused for t in c.tokens} | set(scan.by_token()))
        errors.append(f"unknown concept token(s) {', '.join(unknown)}: not in the loaded checkpoint and no concept "
                      f"file in {folder} defines them (available: {_listing(known)})")
    notes = [f"unreadable files in {folder}: {scan.problem_text()}"] if scan.problems else []
    if strict and errors:
        raise ConceptError("; ".join(errors + notes))
    found.warnings = [f"Mix-of-Show: {m}; left in the prompt as text" for m in errors]
    found.warnings += [f"Mix-of-Show: {m}" for m in notes]
    return found
