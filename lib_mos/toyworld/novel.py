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


def training_images(concept: NovelConcept, n: int = IMAGES_PER_CONCEPT, seed: int = 0) -> list[TrainingImage]:
    """n renders of the concept (random place, size, background), captioned "a <TOK>"."""
    images, _ = world.batch(50_000 + 97 * seed + list(world.STYLES).index(concept.style), n, style=concept.style)
    up = codec_mod.SD_PIXELS // world.SIZE
    out = []
    for i, arr in enumerate(images):
        pic = Image.fromarray((arr * 255).round().astype(np.uint8)).resize((world.SIZE * up,) * 2, Image.NEAREST)
        out.append(TrainingImage(path=Path(f"{concept.style}-{i}.png"), image=pic, caption=f"a {PLACEHOLDER}"))
    return out


# Per-concept changes to the recipe: "split" (two halves, a layout relative to the object) needs a
# longer run at a higher UNet rate; at 400 steps and 1e-3 it reached 25% identity, at 1000 steps 69%.
RECIPES: dict[str, dict] = {"split": {"steps": 1000, "lr_unet": 2e-3}}
DEFAULT_STEPS = 400


def settings(concept: NovelConcept, steps: int | None = None, seed: int = 0) -> training.TrainSettings:
    """The authors' recipe with the rates scaled to this small model (no norm stop: its embedding
    norms are not SD1.5's), no flips (some styles are not mirror-symmetric)."""
    recipe = {"steps": DEFAULT_STEPS, "lr_unet": 1e-3, **RECIPES.get(concept.style, {})}
    if steps is not None:
        recipe["steps"] = steps
    return training.TrainSettings(
        tokens=concept.tokens, class_word=concept.class_word, batch_size=8, resolution=codec_mod.SD_PIXELS,
        lr_embedding=3e-3, lr_text=1e-4, norm_stop=0.0, templates="none", crop_p=0.3, flip_p=0.0,
        views_per_image=8, seed=seed, precision="fp32", **recipe)


def tune(model: SD1Model, codec: codec_mod.PatchCodec, concept: NovelConcept, out: str | Path, *, steps: int | None = None,
         seed: int = 0, progress: Callable | None = None) -> Concept:
    """Train the concept with the product's trainer and write it to `out` (our concept file)."""
    return training.train(model, settings(concept, steps, seed), training_images(concept, seed=seed), out,
                          encoder=codec.encoder(), decoder=codec.decoder(), name=concept.style, overwrite=True,
                          progress=progress)
