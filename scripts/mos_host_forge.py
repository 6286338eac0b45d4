"""Host row: lllyasviel's Forge (f2, `backend`). Every function here has a namesake in
`mos_host_a1111`; `mos_host` picks the row of the running host. docs/forge.md says what each one
reads in Forge's source. Forge's packages are imported inside the functions: the WebUI imports every
file in scripts/, in A1111 too.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lib_mos.models.family import SD1, ModelFamily

AND_PARTS_APART = False
"""Whether a UNet call tells the rows of each AND part of the prompt apart: not here, a call's cond
chunks do not say which part they are (`rows_of_call`)."""


def unet_of(sd_model) -> nn.Module:
    """Forge's UNet module, behind its UNet patcher (ldm's module names, Forge's classes)."""
    return sd_model.forge_objects.unet.model.diffusion_model


def _engines(sd_model) -> list:
    """The text-processing engines, one per encoder in the family's order (each has its own
    textual-inversion database)."""
    if hasattr(sd_model, "text_processing_engine_l"):
        return [sd_model.text_processing_engine_l, sd_model.text_processing_engine_g]
    return [sd_model.text_processing_engine]


def embedding_names(sd_model) -> set[str]:
    """Names of the textual-inversion embeddings any encoding engine knows now."""
    return {name for engine in _engines(sd_model) for name in engine.embeddings.word_embeddings}


def embedding_widths(sd_model, family: ModelFamily) -> list[int]:
    """Each text encoder's embedding width, in the family's order (its token embedding's)."""
    return [int(engine.text_encoder.transformer.text_model.embeddings.token_embedding.weight.shape[1])
            for engine in _engines(sd_model)]


class _WithoutLines(io.TextIOBase):
    """A text stream that passes everything on except whole lines containing any of `words`."""

    def __init__(self, stream, words: set[str]) -> None:
        self.stream, self.words, self.pending = stream, words, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not any(word in line for word in self.words):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not any(word in self.pending for word in self.words):
            self.stream.write(self.pending)
        self.pending = ""
        self.stream.flush()


@contextmanager
def alias_embeddings(sd_model, vectors: dict[str, torch.Tensor | dict[str, torch.Tensor]]) -> Iterator[None]:
    """One-vector textual-inversion embeddings registered under the given names in every encoding
    engine for the block (a dict vector: one per engine key, `clip_l` / `clip_g`, which each engine
    picks by its own key), removed in `finally`. Forge loads embeddings once, not per generation.

    Forge's encoder prints a console line for every embedding it uses and collects their names for
    the infotext ("TI: …") in a module-level dict that the *next* generation's conditioning step
    empties: the aliases are internal, so their lines are dropped and the dict is put back as it
    was (else the next picture's infotext would list them)."""
    from backend.text_processing import classic_engine
    from backend.text_processing.textual_inversion import Embedding

    registered = []
    collected = dict(classic_engine.last_extra_generation_params)
    console = sys.stdout
    try:
        for name, vec in vectors.items():
            e = Embedding(vec, name)
            e.vectors, e.shape = 1, sum(v.shape[-1] for v in vec.values()) if isinstance(vec, dict) else vec.shape[-1]
            for engine in _engines(sd_model):
                engine.embeddings.register_embedding_by_name(e, name)
                registered.append((engine, name))
        if vectors:
            sys.stdout = _WithoutLines(console, set(vectors))
        yield
    finally:
        if sys.stdout is not console:
            sys.stdout.flush()
            sys.stdout = console
        for engine, name in registered:
            engine.embeddings.register_embedding_by_name(None, name)
        classic_engine.last_extra_generation_params.clear()
        classic_engine.last_extra_generation_params.update(collected)


def empty_prompt(sd_model) -> torch.Tensor:
    """[77, D]: the empty prompt's cross-attention context, encoded now (a few padding calls per
    generation; the text encoder as this generation's LoRAs left it). Forge itself tiles a shorter
    prompt's conditioning to a longer one's; padding with the empty prompt, as A1111 does, keeps the
    extension's rows the same in both hosts."""
    from modules import prompt_parser

    with torch.no_grad():
        cond = sd_model.get_learned_conditioning(prompt_parser.SdConditioning([""]))
    return (cond["crossattn"] if isinstance(cond, dict) else cond)[0].clone()


def text_encoders(sd_model, family: ModelFamily) -> tuple[dict[str, nn.Module], nn.Module | None]:
    """(the transformers CLIP text models by the core's text root, None): SD1's one CLIP; SDXL's
    CLIP-L as "0." and bigG as "1.", both transformers models in Forge (no fused q/k/v)."""
    engines = _engines(sd_model)
    if family is SD1:
        return {"": engines[0].text_encoder.transformer}, None
    return {"0.": engines[0].text_encoder.transformer, "1.": engines[1].text_encoder.transformer}, None


COND, UNCOND = 0, 1  # Forge's chunk kinds in `transformer_options["cond_or_uncond"]`


def rows_of_call(cond_or_uncond: list[int], n: int, n_cond: int, n_uncond: int) -> torch.Tensor:
    """[n] indices into the step's rows (A1111's order: n_cond cond rows, then n_uncond uncond rows)
    of a Forge UNet call of n rows made of equal chunks, one per entry of `cond_or_uncond`. A cond
    chunk holds every image's cond (the first n/len cond rows; with AND, each part is its own chunk
    and the parts' rows differ only in the host's own context), an uncond chunk every image's
    uncond."""
    if not cond_or_uncond or n % len(cond_or_uncond):
        raise RuntimeError(f"Forge's UNet call has {n} rows in chunks {cond_or_uncond}")
    chunk = n // len(cond_or_uncond)
    parts = []
    for kind in cond_or_uncond:
        start, have = (0, n_cond) if kind == COND else (n_cond, n_uncond)
        if chunk > have:
            raise RuntimeError(f"Forge's UNet call has chunks of {chunk} rows but the step has {have} "
                               f"{'cond' if kind == COND else 'uncond'} rows")
        parts.append(torch.arange(start, start + chunk))
    return torch.cat(parts)


@contextmanager
def call_rows(unet: nn.Module, begin_call: Callable[[torch.Tensor], None],
              counts: Callable[[], tuple[int, int]]) -> Iterator[None]:
    """Name each UNet call's rows from the chunk kinds Forge passes it (uncond chunks come first),
    before the call runs: a forward pre-hook on the UNet, removed in `finally`."""
    def name_rows(module, args, kwargs):
        options = kwargs.get("transformer_options") or {}
        kinds = options.get("cond_or_uncond")
        x = args[0] if args else kwargs["x"]
        if kinds is None:  # a call Forge's sampler did not batch: take the rows in order
            return None
        begin_call(rows_of_call(list(kinds), x.shape[0], *counts()))
        return None

    handle = unet.register_forward_pre_hook(name_rows, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
