"""Random concepts for the demo, tests and benchmarks (no training data or weights can be
downloaded here), and the authors' ED-LoRA file layout to write them in."""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import torch

from lib_mos import sd1
from lib_mos.concepts import Concept, LoraFactor, unet_ldm_to_diffusers


def random_concept(model: sd1.SD1Model, tokens: tuple[str, ...] = ("<cat1>", "<cat2>"), *, seed: int = 1,
                   rank: int = 4, scale: float = 1.0, name: str | None = None,
                   unet_names: list[str] | None = None, text_names: list[str] | None = None) -> Concept:
    """An ED-LoRA-shaped concept for `model`: [n_tokens, 16, D] embeddings and rank-`rank` LoRA on
    every attention linear (or the given subsets), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(tokens), len(sd1.ATTN2_NAMES), model.config.context_dim, generator=g) * 0.3

    def factor(lin: torch.nn.Linear) -> LoraFactor:
        return LoraFactor(torch.randn(rank, lin.in_features, generator=g) * 0.1,
                          torch.randn(lin.out_features, rank, generator=g) * 0.1, scale)

    unet_names = sd1.unet_attention_linear_names() if unet_names is None else unet_names
    text_names = sd1.text_attention_linear_names() if text_names is None else text_names
    return Concept(name=name or tokens[0].strip("<>"), tokens=tuple(tokens), embeddings=emb,
                   unet_lora={n: factor(model.unet.get_submodule(n)) for n in unet_names},
                   text_lora={n: factor(model.text_encoder.get_submodule(n)) for n in text_names})


def authors_params(concept: Concept, spelling: str = "main") -> dict[str, Any]:
    """The authors' `torch.save` layout: {'params': {'new_concept_embedding': {token: [16, D]},
    'text_encoder': {...}, 'unet': {...}}} with diffusers names, `main` spelling
    `<module>.lora_down.weight` or `research_branch` spelling `<module>_lora.down.weight`."""
    if spelling not in ("main", "research_branch"):
        raise ValueError(f"spelling must be 'main' or 'research_branch', got {spelling!r}")

    def keys(module: str, f: LoraFactor) -> dict[str, torch.Tensor]:
        if spelling == "main":
            return {f"{module}.lora_down.weight": f.down, f"{module}.lora_up.weight": f.up}
        return {f"{module}_lora.down.weight": f.down, f"{module}_lora.up.weight": f.up}

    unet: dict[str, torch.Tensor] = {}
    for name, f in concept.unet_lora.items():
        unet.update(keys(unet_ldm_to_diffusers(name), f))
    text: dict[str, torch.Tensor] = {}
    for name, f in concept.text_lora.items():
        text.update(keys(name, f))
    emb = {t: concept.token_rows(t).clone() for t in concept.tokens}
    return {"params": {"new_concept_embedding": emb, "text_encoder": text, "unet": unet}}


# Zip entries recent torch adds that torch 2.0 did not write (and the WebUI's pickle guard refuses).
_NEWER_ZIP_ENTRIES = (".format_version", ".storage_alignment")


def save_torch_file(obj: Any, path: str | os.PathLike[str], *, style: str = "current") -> None:
    """`torch.save(obj, path)`; `style="torch2.0"` writes the zip as torch 2.0/2.1 did, without the
    entries newer torch adds, and `style="newer"` always with them (whatever torch runs), so tests
    can cover files from both generations of users."""
    if style == "current":
        torch.save(obj, path)
        return
    if style not in ("torch2.0", "newer"):
        raise ValueError(f"style must be 'current', 'torch2.0' or 'newer', got {style!r}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        names = src.namelist()
        for info in src.infolist():
            if style == "newer" or not info.filename.endswith(_NEWER_ZIP_ENTRIES):
                dst.writestr(info, src.read(info))
        if style == "newer":  # what torch.save writes since it added these, even when the running torch (2.1) doesn't
            prefix = names[0].split("/", 1)[0]
            for entry, value in ((".format_version", "1"), (".storage_alignment", "64")):
                if f"{prefix}/{entry}" not in names:
                    dst.writestr(f"{prefix}/{entry}", value)
