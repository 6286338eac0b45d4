"""Sample toy-world pictures with the product's own sampler and score them with the probes.

Everything here goes through the product's paths: `binding.PromptBinder` for prompts (concept
tokens bound layer-wise), `sampling.sample_euler` (the host's default Euler, CFG), and
`attention.RegionalContext` with `regions.layer_masks` for regional composition. Pictures are the
codec's decode, so what the probes see is what a user would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lib_mos.concepts.binding import PromptBinder
from lib_mos.concepts.concept import Concept, applied
from lib_mos.fusion.pipeline import KV_PROJECTIONS
from lib_mos.models import sampling
from lib_mos.models.sd1 import ATTN2_NAMES, SD1Model
from lib_mos.regional.attention import RegionalContext
from lib_mos.regional.loras import RegionDeltas, RegionLora, text_loras_of
from lib_mos.regional.passes import PassRun, region_passes
from lib_mos.regional.regions import (
    PASS_UNET_WEIGHT,
    Region,
    RegionSpec,
    layer_masks,
    level_masks,
    region_masks,
)
from lib_mos.toyworld import codec as codec_mod
from lib_mos.toyworld import world
from lib_mos.toyworld.probe import Probe

STEPS = 30
CFG = 5.0
NEGATIVE = ""  # the empty caption: what the base learned as its unconditional
BATCH = 64


@dataclass(frozen=True)
class Layout:
    """How regions are laid out side by side: `global_weight`, the spec's share of the global
    prompt kept inside each region; `margin`, the share of each 32-px cell's width and height left
    outside its region on every side (0: the regions tile the canvas; > 0: they sit in a
    background the global prompt alone draws, as the authors lay scenes out)."""

    global_weight: float = 0.0
    margin: float = 0.0

    def boxes(self, cells: int) -> list[tuple[float, float, float, float]]:
        """[top, left, bottom, right] fractions of the i-th cell's region, left to right."""
        m = self.margin
        return [(m, (i + m) / cells, 1.0 - m, (i + 1 - m) / cells) for i in range(cells)]

    def spec(self, prompts: Sequence[str]) -> RegionSpec:
        return RegionSpec(tuple(Region(p, box=b, units="fraction") for p, b in zip(prompts, self.boxes(len(prompts)))),
                          global_weight=self.global_weight)

    def describe(self) -> dict[str, float]:
        return {"global_weight": self.global_weight, "margin": self.margin}


TILING = Layout()


@dataclass(frozen=True)
class Sampler:
    """Sampling settings shared by every measurement (so the numbers compare)."""

    steps: int = STEPS
    cfg: float = CFG
    batch: int = BATCH


def pictures(model: SD1Model, codec: codec_mod.PatchCodec, prompts: Sequence[str], seeds: Sequence[int], *,
             concepts: Sequence[Concept] = (), sampler: Sampler = Sampler(), cells: int = 1,
             spec: RegionSpec | Sequence[RegionSpec] | None = None,
             region_loras: Sequence[RegionLora] = (), passes: bool = False) -> torch.Tensor:
    """[B, 3, 32, 32 * cells] pictures in [-1, 1] of prompts[i] with seeds[i], in batches.

    `spec`: regional sampling (its regions' prompts everywhere the spec puts them; `prompts` are the
    global prompts), as the WebUI script runs it; one spec for every picture, or one per picture
    (their regions in the same places and global weights alike). `region_loras`: LoRAs applied inside their regions only,
    unfused, in the same pass (`regional.loras`), each region's text encoded with its own.
    `passes`: each region with LoRAs in a UNet pass of its own, predictions blended (`regional.passes`).
    """
    binder = PromptBinder(model, list(concepts))
    height, width = codec_mod.SD_PIXELS, codec_mod.SD_PIXELS * cells
    specs = None if spec is None else [spec] * len(prompts) if isinstance(spec, RegionSpec) else list(spec)
    processor = masks = global_weight = None
    unet_deltas: RegionDeltas | None = None
    runs: list[PassRun] = []
    if specs is not None:
        if len(specs) != len(prompts):
            raise ValueError(f"{len(specs)} region specs for {len(prompts)} prompts")
        if any(s.global_weights() != specs[0].global_weights() for s in specs):
            raise ValueError("the region specs of one call must keep the global prompt alike")
        masks = layer_masks(specs[0], width, height)
        if any(specs[0].global_weights()):
            global_weight = torch.tensor(specs[0].global_weights())
        processor = RegionalContext()
        levels = level_masks(specs[0], width, height)
        if passes:
            runs = region_passes(model.unet, region_loras, levels, masks, region_masks(specs[0], width, height),
                                 unet_weight=specs[0].pass_unet_weight)
        elif region_loras:
            unet_deltas = RegionDeltas(model.unet, region_loras, len(specs[0].regions))
            unet_deltas.set_masks(levels)
            processor.context_delta = unet_deltas.context_delta
    elif region_loras or passes:
        raise ValueError("region LoRAs and passes need a region spec")
    out = []
    for i in range(0, len(prompts), sampler.batch):
        chunk, chunk_seeds = list(prompts[i:i + sampler.batch]), list(seeds[i:i + sampler.batch])
        cond = binder.encode(chunk)
        uncond = binder.encode([NEGATIVE] * len(chunk))
        if processor is not None:
            rows = _region_rows(binder, specs[i:i + sampler.batch], region_loras)
            for run in runs:  # each pass plans its own rows, with its masks
                run.set_rows(rows, global_weight=global_weight)
            if not runs:
                processor.set_rows(rows, masks, global_weight=global_weight)
        each = [run.sampling_pass() for run in runs]
        with unet_deltas.installed() if unet_deltas else contextlib.nullcontext():
            latents = sampling.sample_euler(model, cond, uncond, seeds=chunk_seeds, height=height, width=width,
                                            steps=sampler.steps, cfg_scale=sampler.cfg,
                                            processor=None if each else processor, passes=each)
        out.append(codec.decode(latents).clamp(-1, 1))
    return torch.cat(out)


def _region_rows(binder: PromptBinder, specs: Sequence[RegionSpec], region_loras: Sequence[RegionLora]) -> torch.Tensor:
    """[2 B, L, K, 77, D]: every picture's region prompts (cond rows), then their negatives (uncond
    rows), region k's texts encoded with region k's LoRAs' text-encoder changes."""
    out = []
    for r in range(len(specs[0].regions)):
        mine = text_loras_of(region_loras, r)
        texts = [s.regions[r].text for s in specs] + [s.regions[r].negative for s in specs]
        if mine:  # a binder of its own: the shared one caches encodings without this region's LoRAs
            with RegionDeltas(binder.model.text_root, mine, 1, masked=False, text=True).installed():
                out.append(PromptBinder(binder.model, binder.concepts).encode(texts))
        else:
            out.append(binder.encode(texts))  # [2 B, L, 77, D]
    return torch.stack(out, dim=2)


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


def prompt_placement(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, cells: int, *, seeds: int = 32,
                     sampler: Sampler = Sampler(), first_seed: int = 4000, layout: Layout = TILING,
                     ) -> tuple[dict[str, float], torch.Tensor]:
    """The ceiling of composition: plain prompts in `cells` side-by-side regions laid out by
    `layout` (random base objects, the global prompt naming them left to right), scored by
    `objects_placed`. Also returns the pictures."""
    rng = np.random.default_rng(first_seed)
    objects = [[world.random_thing(rng) for _ in range(cells)] for _ in range(seeds)]
    prompts = [" and ".join(f"a {t.words()}" for t in row) for row in objects]
    specs = [layout.spec([f"a {t.words()}" for t in row]) for row in objects]
    pics = pictures(model, codec, prompts, [first_seed + i for i in range(seeds)], sampler=sampler, cells=cells,
                    spec=specs)
    return {**objects_placed(probe, pics, objects), "samples": seeds}, pics


def objects_placed(probe: Probe, pics: torch.Tensor, objects: Sequence[Sequence[world.Thing]]) -> dict[str, float]:
    """Pictures [B, 3, 32, 32 k] of base objects asked for left to right (objects[b][i] in the
    i-th 32-px square): `placement`, the share where every square's crop shows one object of the
    shape and colour asked for there; `all_attributes`, texture right too; `one_object_per_region`;
    `identity`, the share of crops with all three attributes right."""
    k, size, n = len(objects[0]), world.SIZE, len(objects)
    crops = torch.cat([pics[..., i * size:(i + 1) * size] for i in range(k)])  # region-major
    pred = probe.predict(crops)
    asked = [row[i] for i in range(k) for row in objects]
    truth = {"shape": [world.SHAPES.index(t.shape) for t in asked],
             "colour": [list(world.COLOURS).index(t.colour) for t in asked],
             "texture": [world.TEXTURES.index(t.texture) for t in asked]}
    ok = {key: (pred[key] == np.asarray(v)).reshape(k, n) for key, v in truth.items()}
    one = (pred["count"] == 0).reshape(k, n)
    placed = (ok["shape"] & ok["colour"] & one).all(axis=0)
    return {"placement": float(placed.mean()), "all_attributes": float((placed & ok["texture"].all(axis=0)).mean()),
            "one_object_per_region": float(one.all(axis=0).mean()),
            "identity": float((ok["shape"] & ok["colour"] & ok["texture"]).mean())}


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


IDENTITY_PARTS = ("tokens", "kv", "spatial", "all")
_KV = frozenset(f"{a}.{p}" for a in ATTN2_NAMES for p in KV_PROJECTIONS)


def concept_part(concept: Concept, part: str) -> Concept:
    """The concept with only part of its UNet LoRA, to find where its identity sits: "tokens" (the
    bound tokens and the text-encoder LoRA, no UNet LoRA), "kv" (plus the attn2 to_k / to_v layers,
    which fusion's k/v stage and regions control), "spatial" (plus every other UNet layer instead),
    "all"."""
    keep = {"tokens": lambda n: False, "kv": lambda n: n in _KV, "spatial": lambda n: n not in _KV,
            "all": lambda n: True}
    if part not in keep:
        raise ValueError(f"unknown part {part!r}; known: {IDENTITY_PARTS}")
    return dataclasses.replace(concept, unet_lora={n: d for n, d in concept.unet_lora.items() if keep[part](n)})


def identity_parts(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, concept: Concept, label: int, *,
                   seeds: int = 16, sampler: Sampler = Sampler()) -> dict[str, float]:
    """The concept alone, identity with each `IDENTITY_PARTS` of it applied."""
    out = {}
    for part in IDENTITY_PARTS:
        piece = concept_part(concept, part)
        with applied([(piece, 1.0, 1.0)], model.unet, model.text_encoder):
            out[part] = identity_rate(model, codec, probe, [piece], [label], seeds=seeds, sampler=sampler)[0]
    return out


def side_by_side(concepts: Sequence[Concept], classes: Sequence[str], layout: Layout = TILING,
                 ) -> tuple[str, RegionSpec]:
    """A global prompt naming the objects' kinds and one region per concept, left to right."""
    return " and ".join(f"a {w}" for w in classes), layout.spec([f"a {c.prompt_words}" for c in concepts])


def placement_rate(model: SD1Model, codec: codec_mod.PatchCodec, probe: Probe, concepts: Sequence[Concept],
                   labels: Sequence[int], classes: Sequence[str], *, seeds: int = 16, sampler: Sampler = Sampler(),
                   first_seed: int = 3000, region_loras: bool = False, layout: Layout = TILING,
                   passes: bool = False, lora_weight: float = 1.0,
                   pass_unet_weight: float = PASS_UNET_WEIGHT) -> tuple[float, torch.Tensor]:
    """Regional composition, concept i in the i-th of k side-by-side squares (regions laid out by
    `layout`): the share of pictures where every square's crop is read as its own concept.
    `region_loras`: each concept's LoRA applied inside its own region only at `lora_weight`
    (unfused, one pass; with `passes`, a pass per region, its UNet layers at `pass_unet_weight`
    of that). Also returns the pictures."""
    k = len(concepts)
    prompt, spec = side_by_side(concepts, classes, layout)
    spec = dataclasses.replace(spec, pass_unet_weight=pass_unet_weight)
    loras = [RegionLora(i, c, lora_weight, c.name) for i, c in enumerate(concepts)] if region_loras else []
    pics = pictures(model, codec, [prompt] * seeds, [first_seed + i for i in range(seeds)], concepts=concepts,
                    sampler=sampler, cells=k, spec=spec, region_loras=loras, passes=passes)
    return float(placed(probe, pics, labels).mean()), pics


def region_lora_spill(model: SD1Model, codec: codec_mod.PatchCodec, concepts: Sequence[Concept],
                      classes: Sequence[str], *, seeds: int = 16, sampler: Sampler = Sampler(),
                      first_seed: int = 3000, layout: Layout = TILING, passes: bool = False,
                      lora_weight: float = 1.0, pass_unet_weight: float = PASS_UNET_WEIGHT) -> list[float]:
    """Per concept i: how much its LoRA, applied at `lora_weight` inside region i only (in a pass of
    its own with `passes`), changes the other squares of the composition against its own square (mean absolute
    pixel change over the same seeds and prompts without it; 0 = no bleed, 1 = as much elsewhere as
    where it was drawn)."""
    k = len(concepts)
    prompt, spec = side_by_side(concepts, classes, layout)
    spec = dataclasses.replace(spec, pass_unet_weight=pass_unet_weight)
    args = (model, codec, [prompt] * seeds, [first_seed + i for i in range(seeds)])
    kwargs = {"concepts": concepts, "sampler": sampler, "cells": k, "spec": spec}
    without = pictures(*args, **kwargs)
    out = []
    for i, concept in enumerate(concepts):
        one = pictures(*args, **kwargs, region_loras=[RegionLora(i, concept, lora_weight, concept.name)],
                       passes=passes)
        per_square = (one - without).abs().mean(dim=(0, 1, 2)).reshape(k, world.SIZE).mean(1)  # [k]
        others = torch.cat([per_square[:i], per_square[i + 1:]]).mean()
        out.append(float(others / per_square[i]))
    return out


def region_reads(probe: Probe, pics: torch.Tensor, labels: Sequence[int]) -> np.ndarray:
    """[k, B] for pictures [B, 3, 32, 32 k]: is the crop of square i read as concept labels[i]?"""
    k, size = len(labels), world.SIZE
    crops = torch.cat([pics[..., i * size:(i + 1) * size] for i in range(k)])  # region-major
    pred = probe.predict(crops)["concept"].reshape(k, len(pics))
    return pred == np.asarray(labels)[:, None]


def placed(probe: Probe, pics: torch.Tensor, labels: Sequence[int]) -> np.ndarray:
    """Per picture [B, 3, 32, 32 k]: is the crop of every square i read as concept labels[i]?"""
    return region_reads(probe, pics, labels).all(axis=0)


def interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's 95% interval of a share measured on n samples."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
