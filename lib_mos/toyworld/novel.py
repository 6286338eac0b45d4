"""Novel concepts: objects in colour schemes and patterns the base world never shows, tuned as
ED-LoRA concepts with the product's own trainer (`lib_mos.training`), from about 10 pictures each.

Each concept's last token starts from its shape's word (the authors' class-word initialisation),
the first from small noise; training pictures are the world's renders at the trainer's resolution
(nearest-upscaled 4x, so the codec's 4x pooling gives the render back exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lib_mos.concepts.concept import Concept
from lib_mos.models.sd1 import SD1Model
from lib_mos.toyworld import codec as codec_mod
from lib_mos.toyworld import world
from lib_mos.training import trainer as training
from lib_mos.training.data import PLACEHOLDER, TrainingImage


@dataclass(frozen=True)
class NovelConcept:
    style: str  # key of world.STYLES

    @property
    def tokens(self) -> tuple[str, str]:
        return (f"<{self.style}1>", f"<{self.style}2>")

    @property
    def class_word(self) -> str:
        return world.STYLES[self.style][0]


NOVEL = tuple(NovelConcept(s) for s in world.STYLES)
IMAGES_PER_CONCEPT = 10


def training_images(concept: NovelConcept, n: int = IMAGES_PER_CONCEPT, seed: int = 0, *,
                    masks: bool = False) -> list[TrainingImage]:
    """n renders of the concept (random place, size, background), captioned "a <TOK>"; `masks`:
    each with its subject mask (the object's coverage), as a user's masked training set."""
    images, scenes = world.batch(50_000 + 97 * seed + list(world.STYLES).index(concept.style), n,
                                 style=concept.style)
    up = codec_mod.SD_PIXELS // world.SIZE
    size = (world.SIZE * up,) * 2
    out = []
    for i, (arr, scene) in enumerate(zip(images, scenes)):
        pic = Image.fromarray((arr * 255).round().astype(np.uint8)).resize(size, Image.NEAREST)
        mask = None
        if masks:
            t = scene.things[0]
            cover = world.coverage(t.shape, t.cx, t.cy, t.r)
            mask = Image.fromarray((cover * 255).round().astype(np.uint8), "L").resize(size, Image.NEAREST)
        out.append(TrainingImage(path=Path(f"{concept.style}-{i}.png"), image=pic, caption=f"a {PLACEHOLDER}",
                                 mask=mask))
    return out


# Two recipes, so the bench can say what each puts where (docs/toyworld.md):
# - "product": the rates scaled 10x up to this small model, no masks, no attention regulariser;
#   "split" (two halves, a layout relative to the object) needs a longer run at a higher UNet rate
#   (at 400 steps and 1e-3 it reached 25% identity, at 1000 steps 69%).
# - "authors": the authors' rates (embeddings 1e-3, text LoRA 1e-5, UNet LoRA 1e-4), subject masks
#   on the loss and their cross-attention regulariser (0.01), more steps for the lower rates.
RECIPES: dict[str, dict] = {
    "product": {"steps": 400, "lr_embedding": 3e-3, "lr_text": 1e-4, "lr_unet": 1e-3, "masks": False,
                "attn_reg_weight": 0.0},
    "authors": {"steps": 1500, "lr_embedding": 1e-3, "lr_text": 1e-5, "lr_unet": 1e-4, "masks": True,
                "attn_reg_weight": 0.01},
}
PER_CONCEPT: dict[tuple[str, str], dict] = {("product", "split"): {"steps": 1000, "lr_unet": 2e-3}}


def recipe(concept: NovelConcept, name: str = "product", steps: int | None = None) -> dict:
    """The recipe's settings for one concept (`steps` overrides its step count)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    out = {**RECIPES[name], **PER_CONCEPT.get((name, concept.style), {})}
    if steps is not None:
        out["steps"] = steps
    return out


def settings(concept: NovelConcept, steps: int | None = None, seed: int = 0,
             recipe_name: str = "product") -> training.TrainSettings:
    """The trainer's settings for `recipe_name` (no norm stop: this model's embedding norms are not
    SD1.5's; no flips: some styles are not mirror-symmetric)."""
    chosen = {k: v for k, v in recipe(concept, recipe_name, steps).items() if k != "masks"}
    return training.TrainSettings(
        tokens=concept.tokens, class_word=concept.class_word, batch_size=8, resolution=codec_mod.SD_PIXELS,
        norm_stop=0.0, templates="none", crop_p=0.3, flip_p=0.0, views_per_image=8, seed=seed, precision="fp32",
        **chosen)


def tune(model: SD1Model, codec: codec_mod.PatchCodec, concept: NovelConcept, out: str | Path, *, steps: int | None = None,
         seed: int = 0, progress: Callable | None = None, recipe_name: str = "product") -> Concept:
    """Train the concept with the product's trainer and write it to `out` (our concept file)."""
    images = training_images(concept, seed=seed, masks=recipe(concept, recipe_name)["masks"])
    return training.train(model, settings(concept, steps, seed, recipe_name), images, out,
                          encoder=codec.encoder(), decoder=codec.decoder(), name=concept.style, overwrite=True,
                          progress=progress)
