"""`make demo` on the toy world: pictures a person can judge, made the way a user makes them.

Fuses three committed novel concepts into the committed base with the product's checkpoint fusion
(a file, as the WebUI tab writes it), loads that file back, and renders a regional composition:
each concept in its own third, left to right. The picture's top row is the concepts' reference
renders, so right or wrong shows at a glance. Then it renders the same regions with nothing
merged, each concept's LoRA inside its own region in a UNet pass of its own (region LoRAs in
separate passes, the canvas's default, which the fidelity table finds best for several concepts in
one picture), and prints that table (bench/fidelity.py's output). Nothing is
trained. The quick demo (`make demo`) samples fewer rows and runs a shorter fusion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion import pipeline as fusion
from lib_mos.toyworld import base, measure, weights, world
from lib_mos.toyworld.novel import NOVEL

FIDELITY = "fidelity.jsonl"
SCALE = 4  # the 32x32 world is upscaled this much (nearest) in the saved picture


def _reference_row(styles: list[str]) -> np.ndarray:
    things = [world.Thing(shape=world.STYLES[s][0], style=s, cx=16, cy=16, r=10) for s in styles]
    return np.concatenate([world.render(world.Scene((t,), "black")) for t in things], axis=1)


def composition_picture(pics: torch.Tensor, styles: list[str]) -> Image.Image:
    """Reference renders on top, then each sample; white lines between rows."""
    rows = [_reference_row(styles)] + [((p.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) for p in pics]
    line = np.ones((1, rows[0].shape[1], 3), np.float32)
    grid = np.concatenate([x for r in rows for x in (r, line)][:-1])
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


# what each picture's top row holds, left to right, for the summary's hint
LOOKS = {"rings": "orange-and-white rings", "frame": "a magenta square with a cyan border",
         "zebra": "a purple-and-white striped triangle", "split": "a teal-and-pink circle",
         "core": "a white cross with a red centre"}


def _look(styles: list[str], samples: int, how: str) -> str:
    """The summary's line for a composition picture: what its reference row shows and how to judge it."""
    where = ("left", "middle", "right") if len(styles) == 3 else tuple(f"third {i + 1}" for i in range(len(styles)))
    refs = ", ".join(f"{LOOKS.get(s, s)} ({w})" for s, w in zip(styles, where))
    return f"top row: {refs}; below, {samples} sample(s) {how}: does each third show the concept above it?"


def run(out: Path, wrote: Callable[..., None], *, seed: int = 0, folder: Path = weights.WEIGHTS,
        count: int = 3, samples: int = 4, spatial_steps: int = 20, check_steps: int = 8,
        region_loras: bool = True) -> Path:
    """Fuse `count` concepts into a checkpoint, compose them regionally, save the picture; with
    `region_loras`, also the same regions with each concept's LoRA in its own (nothing merged).
    `wrote(path, what, look)` reports each file."""
    toy = weights.load(folder)
    styles = [c.style for c in NOVEL[:count]]
    specs = [fused_checkpoint.ConceptSpec(str(weights.concept_path(folder, s))) for s in styles]
    settings = fusion.FusionSettings(templates=("a {}", "{}"), spatial_size=128, spatial_steps=spatial_steps,
                                     check_steps=check_steps, seed=seed)
    fused_path, result = fused_checkpoint.fuse_checkpoint(folder / weights.BASE, specs,
                                                          out / f"toyworld-fused-{'-'.join(styles)}.safetensors",
                                                          settings, overwrite=True)
    wrote(fused_path, f"toy world: {count} novel concepts fused into the trained base (" +
          ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()) + ")",
          f"the toy world's trained base with {', '.join(styles)} fused in (the composition samples it)")
    fused = base.load_base(fused_path)
    concepts = fused_checkpoint.read_fused_concepts(fused_path)
    rate, pics = measure.placement_rate(fused, toy.codec, toy.concept_probe, concepts, list(range(count)),
                                        toy.classes[:count], seeds=samples, first_seed=seed + 3000)
    picture = out / "toyworld-composition.png"
    composition_picture(pics, styles).save(picture)
    prompt, spec = measure.side_by_side(concepts, toy.classes[:count])
    wrote(picture, f"toy world: regional composition, global {prompt!r}, regions " +
          ", ".join(f"{r.text!r}" for r in spec.regions) +
          f" left to right; top row: the concepts' reference renders; every region right in {rate:.0%} of "
          f"{samples} samples",
          _look(styles, samples, f"of the fused checkpoint, one concept per region (all three right: {rate:.0%})"))
    if region_loras:
        # what the fidelity table finds best for several concepts in one picture: nothing merged, each
        # concept's LoRA inside its own region in a pass of its own (the canvas's default), from the base
        rate, pics = measure.placement_rate(toy.model, toy.codec, toy.concept_probe, toy.concepts[:count],
                                            list(range(count)), toy.classes[:count], seeds=samples,
                                            first_seed=seed + 3000, region_loras=True, passes=True)
        regional = out / "toyworld-region-loras.png"
        composition_picture(pics, styles).save(regional)
        wrote(regional, f"toy world: the same regions, nothing merged, each concept's LoRA inside its own region "
              f"in a pass of its own (region LoRAs in separate passes, the base model); every region right in "
              f"{rate:.0%} of {samples} samples",
              _look(styles, samples, f"of the base, each concept's LoRA in its own region and pass, nothing merged "
                                     f"(all three right: {rate:.0%})"))
    table = folder / FIDELITY
    if table.is_file():
        print("toy world fidelity (bench/fidelity.py; identity and placement read by the concept probe):")
        rows = [json.loads(line) for line in table.read_text().splitlines() if line.startswith("{")]
        for r in (r for r in rows if "identity" in r):  # the report-agreement rows have none
            placement = f", placement {r['placement']:.0%}" if "placement" in r else ""
            where = f" (global prompt {r['global_weight']:g} in regions)" if r.get("global_weight") else ""
            where += f", UNet weight in passes {r['pass_unet_weight']:g}" if "pass_unet_weight" in r else ""
            print(f"  {r['concepts']} concept(s), {r['method']:<12} identity {r['identity']:.0%}{placement}{where}")
    return picture
