"""Concept files: the authors' ED-LoRA .pth (both branches' spellings), kohya LoRA + A1111
embedding pairs, our .safetensors format (also a kohya LoRA the host's Lora accepts), validation,
refusal of code-carrying pickles, fuzzing of the readers, and the `convert` command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import Concept, ConceptError, unet_ldm_to_diffusers
from lib_mos.concepts.files import (
    EMBEDDING_PREFIX,
    METADATA_KEY,
    check_against_model,
    check_concept_set,
    read_concept,
    sha256_file,
    write_concept,
)
from lib_mos.concepts.synthetic import random_concept
from lib_mos.models import sd1
from lib_mos.models.family import SD1, SDXL

REPO = Path(__file__).resolve().parents[1]
RANK = 4
LAYERS = 16
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


# ------------------------------------------------------------------------------ building test files
def authors_params(model: sd1.SD1Model, spelling: str = "main", seed: int = 1,
                   tokens: tuple[str, ...] = ("<cat1>", "<cat2>"), unet_names: list[str] | None = None,
                   text_names: list[str] | None = None) -> dict[str, Any]:
    """Exactly the authors' delta_state_dict layout (see `lib_mos.concepts.synthetic.authors_params`)."""
    concept = random_concept(model, tokens, seed=seed, rank=RANK, unet_names=unet_names, text_names=text_names)
    return synthetic.authors_params(concept, "main" if spelling == "main" else "research_branch")


def save_pth(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def make_concept(model: sd1.SD1Model, tokens: tuple[str, ...] = ("<dog1>", "<dog2>"), seed: int = 2,
                 scale: float = 1.0) -> Concept:
    concept = random_concept(model, tokens, seed=seed, rank=RANK, scale=scale, name="dog")
    return dataclasses.replace(concept, class_word="dog", base_model_hash="abc123", source_sha256="f" * 64)


def kohya_tensors(concept: Concept, *, alpha: float | None = 8.0, ldm_spelling: bool = False) -> Tensors:
    """A kohya-trainer style LoRA of `concept`'s factors (lora_unet_<diffusers path>, lora_te_...)."""
    out: Tensors = {}
    for kind, lora in (("unet", concept.unet_lora), ("te", concept.text_lora)):
        for name, f in lora.items():
            path = (name if ldm_spelling else unet_ldm_to_diffusers(name)) if kind == "unet" else name
            stem = f"lora_{kind}_" + path.replace(".", "_")
            out[f"{stem}.lora_down.weight"] = f.down.clone()
            out[f"{stem}.lora_up.weight"] = f.up.clone()
            if alpha is not None:
                out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def assert_same_concept(a: Concept, b: Concept) -> None:
    assert a.tokens == b.tokens
    assert torch.equal(a.embeddings, b.embeddings)
    for la, lb in ((a.unet_lora, b.unet_lora), (a.text_lora, b.text_lora)):
        assert la.keys() == lb.keys()
        for name in la:
            assert torch.equal(la[name].down, lb[name].down), name
            assert torch.equal(la[name].up, lb[name].up), name
            assert la[name].scale == lb[name].scale, name


# ------------------------------------------------------------------- authors' files, our format
@pytest.fixture(scope="module")
def authors_files(tiny, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("authors")
    out = {}
    for spelling in ("main", "research"):
        obj = authors_params(tiny, spelling)
        out[spelling] = (save_pth(obj, folder / f"EDLoRA_cat_{spelling}.pth"), obj)
    return out


@pytest.mark.parametrize("spelling", ["main", "research"])
def test_authors_pth_round_trips_through_our_format(tiny, authors_files, tmp_path, spelling):
    path, obj = authors_files[spelling]
    params = obj["params"]
    concept = read_concept(path)
    assert concept.name == path.stem
    assert concept.tokens == ("<cat1>", "<cat2>")
    assert concept.layers == LAYERS and concept.dim == tiny.config.context_dim and concept.rank == RANK
    assert concept.source_path == str(path)
    assert concept.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    for i, token in enumerate(concept.tokens):
        assert torch.equal(concept.embeddings[i], params["new_concept_embedding"][token])
    assert len(concept.unet_lora) == 128 and len(concept.text_lora) == 48
    down_key, up_key = (".lora_down.weight", ".lora_up.weight") if spelling == "main" else (
        "_lora.down.weight", "_lora.up.weight")
    for ldm, f in concept.unet_lora.items():
        diffusers = unet_ldm_to_diffusers(ldm)
        assert torch.equal(f.down, params["unet"][diffusers + down_key])
        assert torch.equal(f.up, params["unet"][diffusers + up_key])
        assert f.scale == 1.0
    for name, f in concept.text_lora.items():
        assert torch.equal(f.down, params["text_encoder"][name + down_key])
        assert torch.equal(f.up, params["text_encoder"][name + up_key])
    check_against_model(concept, tiny)

    ours = write_concept(concept, tmp_path / "cat.safetensors")
    again = read_concept(ours)
    assert_same_concept(concept, again)
    assert again.name == concept.name
    assert again.source_path == str(ours)
    assert again.source_sha256 == concept.source_sha256  # the original file's, not ours
    check_against_model(again, tiny)


def test_both_spellings_read_as_the_same_concept(authors_files):
    assert_same_concept(read_concept(authors_files["main"][0]), read_concept(authors_files["research"][0]))


def test_bare_params_dict_and_name_override(tiny, tmp_path):
    obj = authors_params(tiny, "main", unet_names=[], text_names=[])["params"]
    concept = read_concept(save_pth(obj, tmp_path / "bare.pt"), name="kitty")
    assert concept.name == "kitty" and concept.unet_lora == {} and concept.text_lora == {}


def test_authors_alpha_buffer_is_their_scale(tiny, tmp_path):
    """Their LoRALinearLayer computes W x + alpha * up(down(x)): alpha is the scale, not alpha/rank."""
    name = sd1.text_attention_linear_names()[0]
    obj = authors_params(tiny, "research", unet_names=[], text_names=[name])
    obj["params"]["text_encoder"][f"{name}_lora.alpha"] = torch.tensor(0.5)
    assert read_concept(save_pth(obj, tmp_path / "a.pth")).text_lora[name].scale == 0.5


def test_content_decides_the_format_not_the_extension(tiny, tmp_path):
    """A safetensors header length whose low byte is 0x80 must not be taken for a pickle, and
    renamed files are still recognised."""
    concept = make_concept(tiny)
    concept.unet_lora, concept.text_lora = {}, {}
    for pad in range(0, 512, 1):
        concept.class_word = "x" * pad
        path = write_concept(concept, tmp_path / "probe.safetensors", overwrite=True)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with low byte 0x80 reached")
    renamed = path.rename(tmp_path / "renamed.pth")
    assert read_concept(renamed).class_word == concept.class_word
    pth = save_pth(authors_params(tiny, "main", unet_names=[], text_names=[]), tmp_path / "authors.safetensors")
    assert read_concept(pth).tokens == ("<cat1>", "<cat2>")


def test_our_file_metadata_and_overwrite(tiny, tmp_path):
    concept = make_concept(tiny, scale=0.5)
    path = write_concept(concept, tmp_path / "dog.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    info = json.loads(meta[METADATA_KEY])
    assert info == {"format": "mos-concept", "version": 3, "name": "dog", "tokens": ["<dog1>", "<dog2>"], "triggers": [],
                    "layers": 16, "dim": tiny.config.context_dim, "rank": RANK, "class_word": "dog",
                    "base_model_hash": "abc123", "source_sha256": "f" * 64, "family": "sd1"}
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert {k for k in keys if not k.startswith("lora_")} == {f"{EMBEDDING_PREFIX}0", f"{EMBEDDING_PREFIX}1"}
    assert len(keys) == 2 + 3 * 176
    again = read_concept(path)
    assert_same_concept(concept, again)
    assert (again.class_word, again.base_model_hash) == ("dog", "abc123")

    before = path.read_bytes()
    with pytest.raises(ConceptError, match="already exists"):
        write_concept(make_concept(tiny, seed=9), path)
    assert path.read_bytes() == before
    write_concept(make_concept(tiny, seed=9), path, overwrite=True)
    assert path.read_bytes() != before
    with pytest.raises(ConceptError, match="safetensors"):
        write_concept(concept, tmp_path / "dog.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.safetensors"]


# --------------------------------------------------------------- the host's Lora reads our file
_RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def host_compvis_key(key: str) -> str:
    """The host's convert_diffusers_name_to_compvis (v1.10.1) for the SD1 block keys a LoRA on
    attention layers reaches: diffusers block indices -> ldm block indices, underscores kept."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def host_lora_load(path: Path, model: sd1.SD1Model) -> tuple[dict[int, tuple[nn.Module, torch.Tensor]], list[str]]:
    """What the host's Lora does with a file: key -> module by its naming rules, then delta =
    up @ down * alpha / rank (alpha missing: 1.0). Returns {id(module): (module, delta)} and the
    keys it could not match (the host only debug-logs those)."""
    wrapped = nn.Module()  # shared.sd_model.cond_stage_model.wrapped
    wrapped.transformer = model.text_encoder
    diffusion = nn.Module()  # shared.sd_model.model (DiffusionWrapper)
    diffusion.diffusion_model = model.unet
    mapping = {name.replace(".", "_"): mod for name, mod in wrapped.named_modules()}
    mapping.update({name.replace(".", "_"): mod for name, mod in diffusion.named_modules()})

    matched: dict[str, tuple[nn.Module, Tensors]] = {}
    failed: list[str] = []
    for key, weight in load_file(str(path)).items():
        stem, _, part = key.partition(".")
        sd_key = host_compvis_key(stem)
        module = mapping.get(sd_key)
        if module is None and (m := _RE_X_PROJ.match(sd_key)):
            module = mapping.get(m[1])
        if module is None and "lora_unet" in stem:
            sd_key = stem.replace("lora_unet", "diffusion_model")
            module = mapping.get(sd_key)
        if module is None:
            failed.append(key)
            continue
        matched.setdefault(sd_key, (module, {}))[1][part] = weight
    deltas = {}
    for sd_key, (module, w) in matched.items():
        assert {"lora_up.weight", "lora_down.weight"} <= set(w), sd_key
        assert type(module) is nn.Linear, sd_key
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        scale = w["alpha"].item() / down.shape[0] if "alpha" in w else 1.0
        updown = (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(module.weight.shape)
        deltas[id(module)] = (module, updown * scale)
    return deltas, failed


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_our_file_is_a_lora_the_host_applies(tiny, tmp_path, scale):
    concept = make_concept(tiny, scale=scale)
    path = write_concept(concept, tmp_path / "dog.safetensors")
    deltas, failed = host_lora_load(path, tiny)
    assert sorted(failed) == [f"{EMBEDDING_PREFIX}0", f"{EMBEDDING_PREFIX}1"]
    assert len(deltas) == 176
    for root, lora in ((tiny.unet, concept.unet_lora), (tiny.text_encoder, concept.text_lora)):
        for name, f in lora.items():
            module = root.get_submodule(name)
            assert id(module) in deltas, name
            assert torch.equal(deltas[id(module)][1], f.delta()), name


# ------------------------------------------------------------------ kohya LoRA + A1111 embedding
@pytest.mark.parametrize("alpha", [8.0, None])
@pytest.mark.parametrize("ldm_spelling", [False, True])
def test_kohya_lora_with_single_vector_pt_embedding(tiny, tmp_path, alpha, ldm_spelling):
    source = make_concept(tiny)
    lora = tmp_path / "doggo_lora.safetensors"
    save_file(kohya_tensors(source, alpha=alpha, ldm_spelling=ldm_spelling), str(lora))
    vec = torch.randn(1, tiny.config.context_dim)
    emb = tmp_path / "doggo.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "doggo", "step": 100,
                "sd_checkpoint": "1234", "sd_checkpoint_name": "tiny"}, emb)
    concept = read_concept(lora, embedding=emb)
    assert concept.name == "doggo" and concept.tokens == ("<doggo>",)
    assert concept.embeddings.shape == (1, LAYERS, tiny.config.context_dim)
    assert all(torch.equal(row, vec[0]) for row in concept.embeddings[0])
    assert concept.source_path == str(lora) and concept.source_sha256 == sha256_file(lora)
    scale = 1.0 if alpha is None else alpha / RANK
    for name, f in (*concept.unet_lora.items(), *concept.text_lora.items()):
        ref = source.unet_lora.get(name) or source.text_lora[name]
        assert torch.equal(f.down, ref.down) and torch.equal(f.up, ref.up) and f.scale == scale
    assert len(concept.unet_lora) == 128 and len(concept.text_lora) == 48
    check_against_model(concept, tiny)
    assert_same_concept(concept, read_concept(write_concept(concept, tmp_path / "out.safetensors")))


def test_kohya_lora_with_multi_vector_embeddings(tiny, tmp_path):
    """n vectors -> n tokens <base1>..<baseN>; `name` replaces the stem; the <> wrapping is optional."""
    lora = tmp_path / "lora.safetensors"
    save_file(kohya_tensors(make_concept(tiny)), str(lora))
    vecs = torch.randn(3, tiny.config.context_dim)
    st_emb = tmp_path / "style.safetensors"
    save_file({"emb_params": vecs}, str(st_emb))
    concept = read_concept(lora, embedding=st_emb)
    assert concept.tokens == ("<style1>", "<style2>", "<style3>") and concept.name == "style"
    for i in range(3):
        assert torch.equal(concept.embeddings[i], vecs[i].expand(LAYERS, -1))
    assert read_concept(lora, embedding=st_emb, name="<art>").tokens == ("<art1>", "<art2>", "<art3>")
    bin_emb = tmp_path / "learned_embeds.bin"
    torch.save({"<toy>": vecs[0]}, bin_emb)  # diffusers textual-inversion concept: one [D] tensor
    assert read_concept(lora, embedding=bin_emb, name="toy").tokens == ("<toy>",)


# ----------------------------------------------------------------------------------- bad inputs
class _Replace:
    """Returned by a `_pth` edit: save this object instead of the edited authors' dict."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def _pth(edit: Callable[[dict[str, Any]], Any]) -> Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]]:
    """A bad-input case from an edit of a small valid authors' file."""
    def build(model: sd1.SD1Model, folder: Path) -> tuple[Path, dict[str, Any]]:
        obj = authors_params(model, "main", unet_names=sd1.unet_attention_linear_names()[:4],
                             text_names=sd1.text_attention_linear_names()[:4])
        result = edit(obj["params"])
        return save_pth(result.obj if isinstance(result, _Replace) else obj, folder / "bad_concept.pth"), {}
    return build


def _raw(data: bytes, name: str = "bad_concept.pth") -> Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]]:
    def build(model: sd1.SD1Model, folder: Path) -> tuple[Path, dict[str, Any]]:
        (folder / name).write_bytes(data)
        return folder / name, {}
    return build


def _truncated(fraction: float, fmt: str) -> Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]]:
    def build(model: sd1.SD1Model, folder: Path) -> tuple[Path, dict[str, Any]]:
        good = folder / f"good.{fmt}"
        if fmt == "pth":
            save_pth(authors_params(model, "main", unet_names=[], text_names=sd1.text_attention_linear_names()[:2]), good)
        else:
            write_concept(make_concept(model), good)
        data = good.read_bytes()
        bad = folder / f"bad_concept.{fmt}"
        bad.write_bytes(data[: int(len(data) * fraction)])
        return bad, {}
    return build


def _ours(edit: Callable[[Tensors, dict[str, str]], None]) -> Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]]:
    def build(model: sd1.SD1Model, folder: Path) -> tuple[Path, dict[str, Any]]:
        good = write_concept(make_concept(model), folder / "good.safetensors")
        with safe_open(str(good), framework="pt") as handle:
            meta = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - not a dict
        edit(tensors, meta)
        bad = folder / "bad_concept.safetensors"
        save_file(tensors, str(bad), metadata=meta)
        return bad, {}
    return build


def _kohya(edit: Callable[[Tensors], None], emb: Any = None) -> Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]]:
    """A kohya LoRA (edited) plus an embedding .pt (`emb`, default a good one)."""
    def build(model: sd1.SD1Model, folder: Path) -> tuple[Path, dict[str, Any]]:
        tensors = kohya_tensors(make_concept(model))
        edit(tensors)
        lora = folder / "bad_concept.safetensors"
        save_file(tensors, str(lora))
        emb_path = folder / "bad_embedding.pt"
        torch.save({"string_to_param": {"*": torch.randn(1, model.config.context_dim)}} if emb is None else emb,
                   emb_path)
        return lora, {"embedding": emb_path}
    return build


def _set(tensors: Tensors, key: str, value: torch.Tensor) -> None:
    tensors[key] = value


_U0 = unet_ldm_to_diffusers(sd1.unet_attention_linear_names()[0])  # down_blocks.0...attn1.to_q
_T0 = sd1.text_attention_linear_names()[0]
_KU0 = "lora_unet_" + _U0.replace(".", "_")
_KT0 = "lora_te_" + _T0.replace(".", "_")

BAD_INPUTS: dict[str, tuple[Callable[[sd1.SD1Model, Path], tuple[Path, dict[str, Any]]], list[str]]] = {
    "missing new_concept_embedding": (_pth(lambda p: p.pop("new_concept_embedding")), ["new_concept_embedding"]),
    "empty new_concept_embedding": (_pth(lambda p: p["new_concept_embedding"].clear()), ["new_concept_embedding"]),
    "wrong layer count": (_pth(lambda p: p["new_concept_embedding"].update({"<cat2>": torch.zeros(8, 32)})),
                          ["<cat2>", "8 layer rows"]),
    "single-row (non layer-wise) embedding": (
        _pth(lambda p: p["new_concept_embedding"].update({"<cat1>": torch.zeros(1, 32)})), ["<cat1>", "enable_edlora"]),
    "embedding width mismatch": (_pth(lambda p: p["new_concept_embedding"].update({"<cat2>": torch.zeros(16, 48)})),
                                 ["<cat2>", "48 wide"]),
    "embedding NaN": (_pth(lambda p: p["new_concept_embedding"]["<cat1>"].__setitem__((3, 4), float("nan"))),
                      ["<cat1>", "NaN"]),
    "LoRA Inf": (_pth(lambda p: p["unet"][f"{_U0}.lora_up.weight"].__setitem__((0, 0), float("inf"))),
                 [f"{_U0}.lora_up.weight", "Inf"]),
    "up/down rank mismatch": (_pth(lambda p: p["unet"].update({f"{_U0}.lora_down.weight": torch.zeros(3, 32)})),
                              [f"{_U0}.lora_down.weight", "ranks do not match"]),
    "down without up": (_pth(lambda p: p["text_encoder"].pop(f"{_T0}.lora_up.weight")), [f"{_T0}.lora_down.weight", "up weight is missing"]),
    "up without down": (_pth(lambda p: p["unet"].pop(f"{_U0}.lora_down.weight")), [f"{_U0}.lora_up.weight", "down weight is missing"]),
    "3-d LoRA weight": (_pth(lambda p: p["unet"].update({f"{_U0}.lora_down.weight": torch.zeros(4, 32, 1)})),
                        [f"{_U0}.lora_down.weight", "dimensions"]),
    "integer tensor": (_pth(lambda p: p["new_concept_embedding"].update({"<cat1>": torch.zeros(16, 32, dtype=torch.int32)})),
                       ["<cat1>", "dtype"]),
    "resnet conv in the authors' file (not a linear)": (
        _pth(lambda p: p["unet"].update({"down_blocks.0.resnets.0.conv1.lora_down.weight":
                                         torch.zeros(4, 128)})), ["resnets.0.conv1.lora_down.weight", "not a linear"]),
    "text mlp LoRA": (_pth(lambda p: p["text_encoder"].update({"text_model.encoder.layers.0.mlp.fc1_lora.up.weight":
                                                               torch.zeros(64, 4)})), ["mlp.fc1_lora.up.weight"]),
    "SD1 has no down_blocks.3 attention": (
        _pth(lambda p: p["unet"].update({"down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q.lora_up.weight":
                                         torch.zeros(32, 4)})), ["down_blocks.3.attentions.0"]),
    "prefixed keys": (_pth(lambda p: p["text_encoder"].update({f"text_encoder.{_T0}.lora_up.weight": torch.zeros(32, 4)})),
                      [f"text_encoder.{_T0}.lora_up.weight"]),
    "full-weight (fused) key": (_pth(lambda p: p["unet"].update({f"{_U0}.weight": torch.zeros(32, 32)})),
                                [f"{_U0}.weight", "not a LoRA weight"]),
    "unknown section": (_pth(lambda p: p.update({"modifier_token": {}})), ["modifier_token"]),
    "token with a space": (_pth(lambda p: p["new_concept_embedding"].update({"<my cat>": torch.zeros(16, 32)})),
                           ["<my cat>"]),
    "token with host prompt syntax": (
        _pth(lambda p: p["new_concept_embedding"].update({"<lora:x>": torch.zeros(16, 32)})), ["<lora:x>"]),
    "not a dict": (_pth(lambda p: _Replace(torch.zeros(3))), ["not an ED-LoRA"]),
    "list of tensors": (_pth(lambda p: _Replace([torch.zeros(3)])), ["not an ED-LoRA"]),
    "params not a dict": (_pth(lambda p: _Replace({"params": [1, 2]})), ["'params'"]),
    "embedding is not a tensor": (_pth(lambda p: p["new_concept_embedding"].update({"<cat1>": [1.0, 2.0]})),
                                  ["<cat1>", "not a tensor"]),
    "truncated .pth": (_truncated(0.6, "pth"), ["corrupted or truncated"]),
    "truncated .pth header": (_truncated(0.01, "pth"), []),
    "truncated .safetensors": (_truncated(0.6, "safetensors"), ["corrupted or truncated"]),
    "safetensors header garbage": (_raw(b"\x20\x00\x00\x00\x00\x00\x00\x00{garbage\x00\xff not json at all}",
                                        "bad_concept.safetensors"), ["corrupted or truncated"]),
    "huge safetensors header length": (_raw(b"\xff" * 7 + b"\x7f{}", "bad_concept.safetensors"), []),
    "empty file": (_raw(b""), ["empty"]),
    "text file": (_raw(b"hello, this is not a model\n", "bad_concept.safetensors"), ["not a PyTorch"]),
    "zip that is not torch": (_raw(b"PK\x03\x04" + b"\x00" * 60, "bad_concept.pth"), ["corrupted or truncated"]),
    "ours: metadata not JSON": (_ours(lambda t, m: m.update({METADATA_KEY: "{not json"})), [METADATA_KEY]),
    "ours: wrong format": (_ours(lambda t, m: m.update({METADATA_KEY: json.dumps({"format": "other"})})),
                           [METADATA_KEY]),
    "ours: future version": (
        _ours(lambda t, m: m.update({METADATA_KEY: m[METADATA_KEY].replace('"version": 3', '"version": 4')})),
        ["version 4"]),
    "ours: for another family": (
        _ours(lambda t, m: m.update({METADATA_KEY: m[METADATA_KEY].replace('"family": "sd1"', '"family": "sdxl"')})),
        ["this concept is for SDXL; this is an SD1.x model"]),
    "ours: missing embedding key": (_ours(lambda t, m: t.pop(f"{EMBEDDING_PREFIX}1")), [f"{EMBEDDING_PREFIX}1"]),
    "ours: extra embedding key": (_ours(lambda t, m: _set(t, f"{EMBEDDING_PREFIX}7", torch.zeros(16, 32))),
                                  [f"{EMBEDDING_PREFIX}7"]),
    "ours: NaN in LoRA": (_ours(lambda t, m: t[f"{_KT0}.lora_down.weight"].__setitem__((0, 0), float("nan"))),
                          [f"{_KT0}.lora_down.weight", "NaN"]),
    "ours: embeddings without metadata": (_ours(lambda t, m: m.pop(METADATA_KEY)), [METADATA_KEY]),
    "ours: dim disagrees": (_ours(lambda t, m: m.update({METADATA_KEY: m[METADATA_KEY].replace('"dim": 32', '"dim": 768')})),
                            ["'dim'"]),
    "kohya: norm layer (a LyCORIS Norm kind)": (
        _kohya(lambda t: _set(t, "lora_unet_down_blocks_0_resnets_0_norm1.w_norm", torch.zeros(32))),
        ["lora_unet_down_blocks_0_resnets_0_norm1.w_norm", "Norm"]),
    "kohya: layer SD1 does not have": (
        _kohya(lambda t: _set(t, "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight", torch.zeros(4, 32))),
        ["lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight", "matches no layer"]),
    "kohya: alpha without factors": (
        _kohya(lambda t: _set(t, "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2.alpha",
                              torch.tensor(4.0))), ["ff_net_2.alpha", "no LoRA kind"]),
    "kohya: LyCORIS part": (_kohya(lambda t: _set(t, f"{_KU0}.hada_w1_a", torch.zeros(4, 4))), [f"{_KU0}.hada_w1_a"]),
    "kohya: missing up": (_kohya(lambda t: t.pop(f"{_KU0}.lora_up.weight")), [f"{_KU0}.lora_down.weight", "up weight is missing"]),
    "kohya: alpha NaN": (_kohya(lambda t: _set(t, f"{_KT0}.alpha", torch.tensor(float("nan")))), [f"{_KT0}.alpha", "NaN"]),
    "kohya: no embedding given": (lambda m, f: (_kohya(lambda t: None)(m, f)[0], {}), ["embedding"]),
}

BAD_EMBEDDINGS: dict[str, tuple[Any, list[str]]] = {
    "two terms": ({"string_to_param": {"*": torch.zeros(1, 32), "x": torch.zeros(1, 32)}}, ["exactly one"]),
    "SDXL embedding": ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, ["SDXL"]),
    "NaN vector": ({"string_to_param": {"*": torch.full((1, 32), float("nan"))}}, ["NaN"]),
    "no tensor": ({"name": "x", "step": 3}, ["not a textual-inversion"]),
    "zero vectors": ({"emb_params": torch.zeros(0, 32)}, ["empty"]),
}


def _message(exc: pytest.ExceptionInfo[ConceptError]) -> str:
    return str(exc.value)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_concept_error_naming_file_and_key(tiny, tmp_path, case):
    build, needles = BAD_INPUTS[case]
    path, kwargs = build(tiny, tmp_path)
    with pytest.raises(ConceptError) as exc:
        read_concept(path, **kwargs)
    assert path.name in _message(exc)
    for needle in needles:
        assert needle in _message(exc)


@pytest.mark.parametrize("case", list(BAD_EMBEDDINGS))
def test_bad_embedding_is_a_concept_error_naming_it(tiny, tmp_path, case):
    payload, needles = BAD_EMBEDDINGS[case]
    path, kwargs = _kohya(lambda t: None, emb=payload)(tiny, tmp_path)
    with pytest.raises(ConceptError) as exc:
        read_concept(path, **kwargs)
    assert kwargs["embedding"].name in _message(exc)
    for needle in needles:
        assert needle in _message(exc)


def test_missing_paths_and_directories(tiny, tmp_path):
    for path in (tmp_path / "nope.pth", tmp_path):
        with pytest.raises(ConceptError, match=re.escape(path.name)):
            read_concept(path)
    lora = tmp_path / "lora.safetensors"
    save_file(kohya_tensors(make_concept(tiny)), str(lora))
    with pytest.raises(ConceptError, match=r"no_such_embedding\.pt"):
        read_concept(lora, embedding=tmp_path / "no_such_embedding.pt")


def test_embedding_argument_is_refused_for_files_that_carry_their_own(tiny, authors_files, tmp_path):
    ours = write_concept(make_concept(tiny), tmp_path / "dog.safetensors")
    for path in (authors_files["main"][0], ours):
        with pytest.raises(ConceptError, match="embedding="):
            read_concept(path, embedding=authors_files["main"][0])


# ---------------------------------------------------------------------------- malicious pickles
class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PayloadOpen(_Payload):
    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save in the authors' layout", "torch.save top level", "plain pickle",
                                 "builtins.open"])
def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, how):
    # torch 2.1 (what the WebUI installs) unpickles anything unless told weights_only=True; newer
    # torch defaults to True, so make it default to False here too: only the explicit flag protects
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_concept.pth"
    if how == "torch.save in the authors' layout":
        torch.save({"params": {"new_concept_embedding": {"<a>": _Payload(marker)}, "unet": {}, "text_encoder": {}}}, path)
    elif how == "torch.save top level":
        torch.save(_Payload(marker), path)
    elif how == "plain pickle":
        path.write_bytes(pickle.dumps({"params": _Payload(marker)}, protocol=4))
    else:
        torch.save({"params": _PayloadOpen(marker)}, path)
    with pytest.raises(ConceptError) as exc:
        read_concept(path)
    assert path.name in str(exc.value) and "refused" in str(exc.value)
    assert not marker.exists()


def test_code_carrying_embedding_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # as torch 2.1 defaults
    marker = tmp_path / "PWNED"
    path, kwargs = _kohya(lambda t: None, emb={"string_to_param": {"*": _Payload(marker)}})(tiny, tmp_path)
    with pytest.raises(ConceptError, match="refused"):
        read_concept(path, **kwargs)
    assert not marker.exists()


# ------------------------------------------------------------------------- sets and the model
def _with(concept: Concept, tokens: tuple[str, ...], source: str) -> Concept:
    emb = concept.embeddings[:1].expand(len(tokens), -1, -1).clone()
    return Concept(name=source, tokens=tokens, embeddings=emb, source_path=f"/loras/{source}.safetensors")


def test_check_concept_set(tiny):
    base = make_concept(tiny)
    a = _with(base, ("<potter1>", "<potter2>"), "potter")
    check_concept_set([a, _with(base, ("<hermione1>", "<hermione2>"), "hermione"),
                       _with(base, ("<potter10>",), "potter10")])
    with pytest.raises(ConceptError, match=r"'<potter2>'.*potter\.safetensors.*potter_copy\.safetensors"):
        check_concept_set([a, _with(base, ("<potter2>",), "potter_copy")])
    with pytest.raises(ConceptError) as exc:
        check_concept_set([a, _with(base, ("x<potter1>",), "other")])
    for needle in ("'<potter1>'", "'x<potter1>'", "potter.safetensors", "other.safetensors"):
        assert needle in str(exc.value)
    with pytest.raises(ConceptError, match=r"'cat'.*'<cat>'"):
        check_concept_set([_with(base, ("cat", "<cat>"), "self")])


def test_check_against_model(tiny, tmp_path):
    """A file shaped for another model family (SDXL's 2048-wide context) fails on the layer it hits."""
    concept = make_concept(tiny)
    check_against_model(concept, tiny)
    tensors = kohya_tensors(concept)
    attn2_k = next(n for n in concept.unet_lora if n.endswith("attn2.to_k"))
    stem = "lora_unet_" + unet_ldm_to_diffusers(attn2_k).replace(".", "_")
    tensors[f"{stem}.lora_down.weight"] = torch.randn(RANK, 2048)
    lora = tmp_path / "sdxl_like.safetensors"
    save_file(tensors, str(lora))
    emb = tmp_path / "sdxl_like_emb.safetensors"
    save_file({"emb_params": torch.randn(1, tiny.config.context_dim)}, str(emb))
    odd = read_concept(lora, embedding=emb)
    with pytest.raises(ConceptError) as exc:
        check_against_model(odd, tiny)
    assert "sdxl_like.safetensors" in str(exc.value) and attn2_k in str(exc.value)

    wide = tmp_path / "wide.pth"
    save_pth({"params": {"new_concept_embedding": {"<w>": torch.randn(16, 768)}}}, wide)
    with pytest.raises(ConceptError, match=r"wide\.pth.*768"):
        check_against_model(read_concept(wide), tiny)
    short = tmp_path / "eight_layers.pth"
    save_pth({"params": {"new_concept_embedding": {"<s>": torch.randn(8, 32)}}}, short)
    with pytest.raises(ConceptError, match=r"eight_layers\.pth.*8 layer rows"):
        check_against_model(read_concept(short, layers=8), tiny)


# --------------------------------------------------------------------------------------- fuzzing
@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fail instead of hanging (POSIX; elsewhere the fuzz just runs without the guard)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum, frame):
        raise TimeoutError(f"reader took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_seeds(tiny, tmp_path_factory) -> dict[str, tuple[Path, bytes]]:
    """Small valid files (few LoRA targets) so mutations often land in structure, not in floats."""
    folder = tmp_path_factory.mktemp("fuzz")
    pth = save_pth(authors_params(tiny, "research", unet_names=sd1.unet_attention_linear_names()[:2],
                                  text_names=sd1.text_attention_linear_names()[:2]), folder / "seed.pth")
    small = make_concept(tiny)
    small.unet_lora = dict(list(small.unet_lora.items())[:2])
    small.text_lora = dict(list(small.text_lora.items())[:2])
    ours = write_concept(small, folder / "seed.safetensors")
    return {"pth": (folder / "mutant.pth", pth.read_bytes()),
            "safetensors": (folder / "mutant.safetensors", ours.read_bytes())}


def _mutations(size: int) -> st.SearchStrategy[tuple[str, Any]]:
    position = st.one_of(st.integers(0, min(size - 1, 1024)), st.integers(max(0, size - 1024), size - 1),
                         st.integers(0, size - 1))
    flips = st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=4)
    return st.one_of(st.tuples(st.just("truncate"), st.integers(0, size - 1)), st.tuples(st.just("flip"), flips))


def _mutate(data: bytes, mutation: tuple[str, Any]) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    out = bytearray(data)
    for pos, bit in arg:
        out[pos] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_fuzzed_files_give_a_concept_or_a_concept_error(fuzz_seeds, fmt):
    path, data = fuzz_seeds[fmt]

    @settings(max_examples=50, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutation=_mutations(len(data)))
    def check(mutation):
        path.write_bytes(_mutate(data, mutation))
        try:
            with _time_limit(20):
                concept = read_concept(path)
        except ConceptError as exc:
            assert path.name in str(exc)
            return
        assert isinstance(concept, Concept)
        assert bool(torch.isfinite(concept.embeddings).all()) and concept.layers == LAYERS

    check()


# ---------------------------------------------------------------------------------- command line
def _cli(*args: str | Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lib_mos", "convert", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_convert_cli(tiny, authors_files, tmp_path):
    """Bad inputs: non-zero exit, one stderr line naming the file, nothing written; a good .pth
    converts. All processes run at once because each start pays for importing torch."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    marker = tmp_path / "PWNED"
    evil = inputs / "evil_concept.pth"
    torch.save({"params": {"new_concept_embedding": {"<a>": _Payload(marker)}}}, evil)
    truncated = inputs / "truncated_concept.pth"
    truncated.write_bytes(authors_files["main"][0].read_bytes()[:5000])
    existing = tmp_path / "existing" / "taken.safetensors"
    existing.parent.mkdir()
    existing.write_bytes(b"keep me")
    good_in, _ = authors_files["research"]
    out = tmp_path / "out"
    out.mkdir()
    bad = {"missing_concept.pth": _cli(inputs / "missing_concept.pth", out / "a.safetensors"),
           evil.name: _cli(evil, out / "b.safetensors"),
           truncated.name: _cli(truncated, out / "c.safetensors"),
           existing.name: _cli(good_in, existing)}
    good = _cli(good_in, out / "good" / "cat.safetensors")
    try:
        for name, proc in bad.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode != 0, name
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and name in lines[0] and "Traceback" not in stderr, (name, stderr)
        stdout, stderr = good.communicate(timeout=120)
        assert good.returncode == 0, stderr
    finally:  # a failed assertion must not leave the other conversions running
        for proc in (*bad.values(), good):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not marker.exists()
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["good", "good/cat.safetensors"]
    assert "<cat1> <cat2>" in stdout and "16 layers" in stdout and "rank 4" in stdout and "176 LoRA" in stdout
    assert_same_concept(read_concept(good_in), read_concept(out / "good" / "cat.safetensors"))


def test_convert_in_process(tiny, tmp_path, capsys):
    """More bad inputs through the same entry point without paying a process start each."""
    from lib_mos.cli.main import main

    kohya = tmp_path / "kohya_only.safetensors"
    save_file(kohya_tensors(make_concept(tiny)), str(kohya))
    nan = tmp_path / "nan_concept.pth"
    obj = authors_params(tiny, "main", unet_names=[], text_names=[])
    obj["params"]["new_concept_embedding"]["<cat1>"][0, 0] = float("nan")
    save_pth(obj, nan)
    good = save_pth(authors_params(tiny, "main", unet_names=[], text_names=[]), tmp_path / "good.pth")
    bad_emb = tmp_path / "bad_embedding.pt"
    torch.save({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, bad_emb)
    out = tmp_path / "out"
    out.mkdir()
    cases = [([kohya, out / "a.safetensors"], kohya.name),
             ([kohya, out / "b.safetensors", "--embedding", bad_emb], bad_emb.name),
             ([nan, out / "c.safetensors"], nan.name),
             ([good, out / "d.ckpt"], "d.ckpt"),
             ([tmp_path, out / "e.safetensors"], tmp_path.name)]
    for argv, name in cases:
        assert main(["convert", *map(str, argv)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and name in err, err
    assert list(out.iterdir()) == []
    emb = tmp_path / "hero.safetensors"
    save_file({"emb_params": torch.randn(2, tiny.config.context_dim)}, str(emb))
    assert main(["convert", str(kohya), str(out / "hero.safetensors"), "--embedding", str(emb)]) == 0
    assert "<hero1> <hero2>" in capsys.readouterr().out
    assert read_concept(out / "hero.safetensors").tokens == ("<hero1>", "<hero2>")


@pytest.mark.parametrize("family", [SD1, SDXL], ids=["sd1", "sdxl"])
def test_the_shipped_unet_layer_names_are_ldms(family):
    """LoRA keys resolve against a shipped list of the UNet's layers (Forge has no ldm to build
    one from): it must be exactly ldm's, in order, convs marked."""
    from lib_mos.models.unet_layers import from_ldm, unet_layers

    shipped = unet_layers(family)
    assert list(shipped.items()) == list(from_ldm(family).items())
    assert shipped["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] is False
    assert shipped["input_blocks.0.0"] is True
