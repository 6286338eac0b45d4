"""Sample toy-world pictures with the product's own sampler and score them with the probes.

Everything here goes through the product's paths: `binding.PromptBinder` for prompts (concept
tokens bound layer-wise), `sampling.sample_euler` (the host's default Euler, CFG), and
`attention.RegionalContext` with `regions.layer_masks` for regional composition. Pictures are the
codec's decode, so what the probes see is what a user would see.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lib_mos.concepts.binding import PromptBinder
from lib_mos.concepts.concept import Concept
from lib_mos.models import sampling
from lib_mos.models.sd1 import SD1Model
from lib_mos.regional.attention import RegionalContext
from lib_mos.regional.regions import Region, RegionSpec, layer_masks
from lib_mos.toyworld import codec as codec_mod
from lib_mos.toyworld import world
from lib_mos.toyworld.probe import Probe

STEPS = 30
CFG = 5.0
NEGATIVE = ""  # the empty caption: what the base learned as its unconditional
BATCH = 64


@dataclass(frozen=True)
class Sampler:
    """Sampling settings shared by every measurement (so the numbers compare)."""

    steps: int = STEPS
    cfg: float = CFG
    batch: int = BATCH


def pictures(model: SD1Model, codec: codec_mod.PatchCodec, prompts: Sequence[str], seeds: Sequence[int], *,
             concepts: Sequence[Concept] = (), sampler: Sampler = Sampler(), cells: int = 1,
             spec: RegionSpec | None = None) -> torch.Tensor:
    """[B, 3, 32, 32 * cells] pictures in [-1, 1] of prompts[i] with seeds[i], in batches.

    `spec`: regional sampling (its regions' prompts everywhere the spec puts them; `prompts` are the
    global prompts), as the WebUI script runs it.
    """
    binder = PromptBinder(model, list(concepts))
    height, width = codec_mod.SD_PIXELS, codec_mod.SD_PIXELS * cells
    processor, region_rows = None, None
    if spec is not None:
        regions = binder.encode([r.text for r in spec.regions])  # [K, L, 77, D]
        negatives = binder.encode([r.negative for r in spec.regions])
        region_rows = torch.stack([regions, negatives]).transpose(1, 2)  # [2, L, K, 77, D]
        masks = layer_masks(spec, width, height)
        processor = RegionalContext()
    out = []
    for i in range(0, len(prompts), sampler.batch):
        chunk, chunk_seeds = list(prompts[i:i + sampler.batch]), list(seeds[i:i + sampler.batch])
        cond = binder.encode(chunk)
        uncond = binder.encode([NEGATIVE] * len(chunk))
        if processor is not None:
            b = len(chunk)
            rows = region_rows[:, None].expand(2, b, *region_rows.shape[1:]).reshape(2 * b, *region_rows.shape[1:])
            processor.set_rows(rows, masks)
        latents = sampling.sample_euler(model, cond, uncond, seeds=chunk_seeds, height=height, width=width,
                                        steps=sampler.steps, cfg_scale=sampler.cfg, processor=processor)
        out.append(codec.decode(latents).clamp(-1, 1))
    return torch.cat(out)


# ------------------------------------------------------------------------------------ base model


def single_object_scenes() -> list[world.Thing]:
    """All 48 base objects (their captions are what is asked for)."""
    return [world.Thing(shape=s, colour=c, texture=t)
            for s, c, t in itertools.product(world.SHAPES, world.COLOURS, world.TEXTURES)]


def base_accuracy(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, *, seeds_per_caption: int = 2,
                  sampler: Sampler = Sampler(), first_seed: int = 1000) -> dict[str, float]:
    """Single-object captions, every combination: per-attribute accuracy and all-attributes-correct."""
    things = single_object_scenes()
    prompts = [f"a {t.words()}" for t in things for _ in range(seeds_per_caption)]
    seeds = [first_seed + i for i in range(len(prompts))]
    pred = probe.predict(pictures(model, codec, prompts, seeds, sampler=sampler))
    truth = {"shape": [world.SHAPES.index(t.shape) for t in things],
             "colour": [list(world.COLOURS).index(t.colour) for t in things],
             "texture": [world.TEXTURES.index(t.texture) for t in things]}
    ok = {k: pred[k] == np.repeat(v, seeds_per_caption) for k, v in truth.items()}
    result = {k: float(v.mean()) for k, v in ok.items()}
    result["one_object"] = float((pred["count"] == 0).mean())
    result["all_correct"] = float(np.logical_and.reduce(list(ok.values())).mean())
    result["samples"] = len(prompts)
    return result


# ------------------------------------------------------------------------------------ concepts


def identity_rate(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, concepts: Sequence[Concept],
                  labels: Sequence[int], *, seeds: int = 16, sampler: Sampler = Sampler(),
                  first_seed: int = 2000) -> list[float]:
    """Per concept: the share of "a <tok1> <tok2>" pictures the concept probe calls that concept.

    All concepts are bound at once (as in a fused model); the model's weights are the caller's.
    """
    prompts = [f"a {c.prompt_words}" for c in concepts for _ in range(seeds)]
    seed_list = [first_seed + i % seeds for i in range(len(prompts))]
    pred = probe.predict(pictures(model, codec, prompts, seed_list, concepts=concepts, sampler=sampler))["concept"]
    return [float((pred[i * seeds:(i + 1) * seeds] == label).mean()) for i, label in enumerate(labels)]


def side_by_side(concepts: Sequence[Concept], classes: Sequence[str]) -> tuple[str, RegionSpec]:
    """A global prompt naming the objects' kinds and one region per concept, left to right."""
    k = len(concepts)
    regions = tuple(Region(f"a {c.prompt_words}", box=(0.0, i / k, 1.0, (i + 1) / k), units="fraction")
                    for i, c in enumerate(concepts))
    return " and ".join(f"a {w}" for w in classes), RegionSpec(regions=regions)


def placement_rate(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, concepts: Sequence[Concept],
                   labels: Sequence[int], classes: Sequence[str], *, seeds: int = 16, sampler: Sampler = Sampler(),
                   first_seed: int = 3000) -> tuple[float, torch.Tensor]:
    """Regional composition, concept i in the i-th of k side-by-side squares: the share of pictures
    where every square's crop is read as its own concept. Also returns the pictures."""
    k = len(concepts)
    prompt, spec = side_by_side(concepts, classes)
    pics = pictures(model, codec, [prompt] * seeds, [first_seed + i for i in range(seeds)], concepts=concepts,
                    sampler=sampler, cells=k, spec=spec)
    return float(placed(probe, pics, labels).mean()), pics


def placed(probe: Probe, pics: torch.Tensor, labels: Sequence[int]) -> np.ndarray:
    """Per picture [B, 3, 32, 32 k]: is the crop of every square i read as concept labels[i]?"""
    k, size = len(labels), world.SIZE
    crops = torch.cat([pics[..., i * size:(i + 1) * size] for i in range(k)])  # region-major
    pred = probe.predict(crops)["concept"].reshape(k, len(pics))
    return (pred == np.asarray(labels)[:, None]).all(axis=0)
