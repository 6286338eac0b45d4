"""Host glue: which concepts a generation's prompts mention, and layer-wise binding through the
WebUI's own prompt encoder.

Concepts come from the loaded checkpoint (a fused one carries its concepts' embeddings) and from
concept files in the Lora folder (`lib_mos.concepts.library`, remembered between generations).

The host encodes prompts with chunks beyond 75 tokens, emphasis and BREAK; its textual-inversion
machinery replaces input-embedding rows at token positions, which is one layer's worth of
ED-LoRA binding. Each (layer, concept token) row is registered as a temporary one-vector
embedding under an alias name, all layer copies are encoded in one batched call, and the aliases
are unregistered in `finally`. Must run inside the generation (the host reloads embeddings at the
start of `process_images`).
"""

from __future__ import annotations

import os
import re

import torch

from lib_mos.concepts.binding import PromptBinder, aliased_prompts
from lib_mos.concepts.concept import Concept
from lib_mos.concepts.library import ConceptLibrary, FoundConcepts, resolve
from lib_mos.files import import_sibling
from lib_mos.fusion.checkpoint import read_fused_concepts
from lib_mos.models.family import SD1, ModelFamily
from lib_mos.prompt_tags import replace_extra_network_tags
from modules import paths, prompt_parser, shared

mos_host = import_sibling(__file__, "mos_host")

_TOKEN = re.compile(r"<[^<>:\s,]+>")

LIBRARY = ConceptLibrary()
_fused: dict[str, tuple[int, list[Concept]]] = {}


def concept_folder() -> str:
    """The Lora folder (`--lora-dir` belongs to the built-in Lora extension; default models/Lora)."""
    return getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")


def concept_tokens_mentioned(texts: list[str]) -> set[str]:
    """`<name>` tokens in the texts, extra-network tags like `<lora:x:1>` excluded."""
    return {t for text in texts for t in _TOKEN.findall(replace_extra_network_tags(str(text), " "))}


def fused_concepts(sd_model) -> list[Concept]:
    """Concepts fused into the loaded checkpoint (read once per checkpoint file version)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = str(getattr(info, "filename", "") or "")
    if not filename.endswith(".safetensors") or not os.path.isfile(filename):
        return []
    stamp = os.stat(filename).st_mtime_ns
    cached = _fused.get(filename)
    if cached is None or cached[0] != stamp:
        cached = _fused[filename] = (stamp, read_fused_concepts(filename))
    return cached[1]


def find_concepts(texts: list[str], *, strict: bool) -> FoundConcepts:
    """The concepts defining the `<token>`s in `texts` (textual-inversion names excluded): from the
    loaded checkpoint first, then from the Lora folder; see `lib_mos.concepts.library.resolve`."""
    wanted = concept_tokens_mentioned(texts) - mos_host.ROW.embedding_names(shared.sd_model)
    if not wanted:
        return FoundConcepts()
    folder = concept_folder()
    return resolve(wanted, fused_concepts(shared.sd_model), LIBRARY, folder, strict=strict)


def embedding_parts(sd_model, family: ModelFamily) -> list[tuple[str, slice]] | None:
    """For a family with several text encoders (SDXL): each encoder's textual-inversion key with
    its slice of a concept's embedding row, in the family's order (CLIP-L "clip_l", then bigG
    "clip_g"), the widths read from the live encoders; None for one encoder (the whole row is its
    vector)."""
    if len(family.text_encoders) == 1:
        return None
    parts, start = [], 0
    for spec, width in zip(family.text_encoders, mos_host.ROW.embedding_widths(sd_model, family)):
        parts.append((spec.key, slice(start, start + width)))
        start += width
    return parts


def encode_bound(sd_model, binder: PromptBinder, prompts: list[str],
                 cache: dict[str, torch.Tensor] | None = None, family: ModelFamily = SD1,
                 negative: bool = False, vector_changes: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L, T, D] layer-wise contexts of `prompts`, T a multiple of 77 as the host makes it (the
    cross-attention part of the host's conditioning). `negative`: encoded as the host encodes
    negative prompts (SDXL: an empty one is zeros), so `cache` must hold one kind only.

    `cache` (prompt -> [L, T, D]) lets one generation encode each prompt once. As in the host for
    a batch, emphasis's mean restore is computed over the batch it encodes, here all L copies of a
    prompt together.

    `vector_changes` (SDXL, prompt -> [V]): filled for each prompt with concept tokens with how
    binding changes the UNet's vector input: the mean of its L copies' vectors (the library's
    definition, `lib_mos.concepts.binding`) minus the vector of the prompt as written, both at the
    host's default size, so the size part cancels and the change adds to the generation's own."""
    cache = {} if cache is None else cache
    todo = [p for p in dict.fromkeys(prompts) if p not in cache]
    plain = [p for p in todo if not binder.concept_tokens_in(p)]
    bound = [p for p in todo if p not in plain]
    if plain:  # no concept tokens: one pass, the same context for every layer
        with torch.no_grad():
            z = family.crossattn(sd_model.get_learned_conditioning(
                prompt_parser.SdConditioning(plain, is_negative_prompt=negative)))
        for p, zp in zip(plain, z):
            cache[p] = zp.unsqueeze(0).expand(binder.layers, -1, -1)
    texts, rows = aliased_prompts(binder, bound)
    parts = embedding_parts(sd_model, family) if rows else None
    vectors = {name: row.unsqueeze(0) if parts is None else {key: row.unsqueeze(0)[:, part] for key, part in parts}
               for name, row in rows.items()}
    with mos_host.ROW.alias_embeddings(sd_model, vectors), torch.no_grad():
        for k, prompt in enumerate(bound):
            copies = texts[k * binder.layers:(k + 1) * binder.layers]
            conditioning = sd_model.get_learned_conditioning(
                prompt_parser.SdConditioning(copies, is_negative_prompt=negative))
            cache[prompt] = family.crossattn(conditioning)
            if vector_changes is not None and family.dict_conditioning:
                written = sd_model.get_learned_conditioning(
                    prompt_parser.SdConditioning([prompt], is_negative_prompt=negative))["vector"][0]
                vector_changes[prompt] = conditioning["vector"].mean(0) - written
    return torch.stack([cache[p] for p in prompts])
