"""A folder of concept files as a token lookup: what is listed, what is named as unreadable, what
is read again, and how tokens resolve (checkpoint first, unknown tokens, authors' files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lib_mos.concepts import library as concept_library
from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import ConceptError
from lib_mos.concepts.files import write_concept
from lib_mos.concepts.library import ConceptLibrary, lora_hash, resolve
from lib_mos.models import sd1


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


@pytest.fixture
def folder(tmp_path, tiny) -> Path:
    """cat.safetensors (ours), potter.pth (authors'), plain.safetensors (an ordinary LoRA),
    notes.pt (a pickle that is no concept), broken.safetensors and broken.pth (garbage)."""
    lora = tmp_path / "Lora"
    (lora / "sub").mkdir(parents=True)
    write_concept(synthetic.random_concept(tiny, ("<cat1>", "<cat2>"), seed=1, name="cat"), lora / "sub" / "cat.safetensors")
    potter = synthetic.random_concept(tiny, ("<potter1>", "<potter2>"), seed=2)
    synthetic.save_torch_file(synthetic.authors_params(potter), lora / "potter.pth")
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(lora / "plain.safetensors"))
    torch.save({"step": torch.tensor(3)}, lora / "notes.pt")
    (lora / "broken.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{garbage")
    (lora / "broken.pth").write_bytes(b"PK\x03\x04 not really a zip")
    return lora


def test_scan_lists_concepts_and_names_unreadable_files(folder):
    scan = ConceptLibrary().scan(folder)
    assert [(e.path.name, e.tokens, e.authors_format) for e in scan.entries] == [
        ("potter.pth", ("<potter1>", "<potter2>"), True), ("cat.safetensors", ("<cat1>", "<cat2>"), False)]
    assert sorted(p.name for p, _ in scan.problems) == ["broken.pth", "broken.safetensors"]
    assert "broken.safetensors" in scan.problem_text() and "broken.pth" in scan.problem_text()
    assert set(scan.by_token()) == {"<cat1>", "<cat2>", "<potter1>", "<potter2>"}


def test_scan_reads_each_file_once_per_version(folder, monkeypatch):
    library = ConceptLibrary()
    library.scan(folder)
    read = []
    original = concept_library._tokens_of
    monkeypatch.setattr(concept_library, "_tokens_of", lambda p: read.append(p.name) or original(p))
    library.scan(folder)
    assert read == []
    cat = folder / "sub" / "cat.safetensors"
    os.utime(cat, ns=(cat.stat().st_atime_ns, cat.stat().st_mtime_ns + 10**9))
    library.scan(folder)
    assert read == ["cat.safetensors"]


def test_lora_hash_is_the_webuis(folder):
    """The WebUI's Lora hashes a .safetensors file's data after the header (kohya's addnet hash)."""
    cat = folder / "sub" / "cat.safetensors"
    data = cat.read_bytes()
    assert lora_hash(cat) == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert lora_hash(folder / "potter.pth") == hashlib.sha256((folder / "potter.pth").read_bytes()).hexdigest()
    assert ConceptLibrary().short_hash(cat) == lora_hash(cat)[:12]


def test_resolve_prefers_the_checkpoint_and_records_sources(folder, tiny):
    library = ConceptLibrary()
    fused_cat = synthetic.random_concept(tiny, ("<cat1>", "<cat2>"), seed=9, name="cat")
    found = resolve({"<cat1>"}, [fused_cat], library, folder, strict=True)
    assert found.concepts == [fused_cat] and found.sources == ["<cat1> <cat2> from the checkpoint"]
    assert found.files == {}  # fused: no file whose LoRA a region would add
    found = resolve({"<cat2>"}, [], library, folder, strict=True)
    assert found.concepts[0].tokens == ("<cat1>", "<cat2>")
    assert found.files == dict.fromkeys(("<cat1>", "<cat2>"), folder / "sub" / "cat.safetensors")
    assert found.sources == [f"<cat1> <cat2> from cat.safetensors@{lora_hash(folder / 'sub' / 'cat.safetensors')[:12]}"]
    assert any("broken.safetensors" in w for w in found.warnings)  # named even when nothing failed


def test_unknown_and_authors_tokens(folder):
    library = ConceptLibrary()
    with pytest.raises(ConceptError) as exc:
        resolve({"<dog1>", "<potter1>"}, [], library, folder, strict=True)
    message = str(exc.value)
    assert "unknown concept token(s) <dog1>" in message
    assert "available: <cat1>, <cat2>, <potter1>, <potter2>" in message
    assert "potter.pth" in message and "convert" in message and "broken.pth" in message
    found = resolve({"<dog1>", "<potter1>"}, [], library, folder, strict=False)
    assert found.concepts == []
    assert sum("left in the prompt as text" in w for w in found.warnings) == 2
