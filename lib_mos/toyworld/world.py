"""The toy world: 32x32 pictures of one or two simple objects, and wide canvases (64x32, 96x32) of
one object per 32-px cell, with captions, deterministic by seed.

An object is a shape x colour x texture (4 x 4 x 3 = 48 kinds) at a position and size; the
background is plain or faintly patterned (never named in captions, so the model learns it as
free variation). Novel concepts (`STYLES`) are objects painted in colour schemes and patterns the
base world never shows; they are what the ED-LoRA concepts learn.

Patterns live on the absolute 2-pixel grid, which the 2x2 patch codec keeps exactly; edges are
anti-aliased by 4x supersampling. Everything is numpy, vectorised per object.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.78, 0.22),
    "blue": (0.18, 0.35, 0.98),
    "yellow": (0.98, 0.88, 0.10),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("plain", "striped", "checked")  # "plain" is not written in captions
BACKGROUNDS = ("black", "grey", "navy", "brown", "grid", "gradient")
_PLAIN_BG = {"black": (0.03, 0.03, 0.03), "grey": (0.20, 0.20, 0.20), "navy": (0.04, 0.06, 0.24),
             "brown": (0.22, 0.13, 0.06)}
_DARK = 0.3  # texture: the dark part of a pattern is the colour times this
_SS = 4  # supersampling for anti-aliased edges


@dataclass(frozen=True)
class Thing:
    """One object: what it is (shape and colour/texture, or a novel style) and where."""

    shape: str
    colour: str = "red"
    texture: str = "plain"
    style: str | None = None  # a key of STYLES: overrides colour and texture
    cx: float = 16.0
    cy: float = 16.0
    r: float = 8.0

    def words(self) -> str:
        """The caption words of a base object ("red striped circle")."""
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"{self.colour} {texture}{self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str = "black"
    width: int = SIZE  # pixels; the height is always SIZE

    def caption(self) -> str:
        """"a red circle" or "a red circle and a blue striped square" (base objects only)."""
        if any(t.style for t in self.things):
            raise ValueError("scenes with novel-style objects have no base caption")
        return " and ".join(f"a {t.words()}" for t in self.things)


# ------------------------------------------------------------------------------------ geometry


@functools.cache
def _grid(scale: int, width: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a SIZE x width canvas at `scale` subsamples per pixel, in pixel
    units: x [SIZE * scale, width * scale], y alike (read-only: shared between calls)."""
    x, y = np.meshgrid((np.arange(width * scale) + 0.5) / scale, (np.arange(SIZE * scale) + 0.5) / scale)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def shape_mask(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean inside-test of a shape of radius r at (cx, cy) on coordinates x, y."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.82 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base at cy + 0.8 r
        top, bottom = -r, 0.8 * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * r)
    if shape == "cross":
        arm = 0.36 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; the world knows {SHAPES}")


def coverage(shape: str, cx: float, cy: float, r: float, width: int = SIZE) -> np.ndarray:
    """[32, width] fraction of each pixel inside the shape (anti-aliased alpha)."""
    inside = shape_mask(shape, cx, cy, r, *_grid(_SS, width)).astype(np.float32)
    return inside.reshape(SIZE, _SS, width, _SS).mean(axis=(1, 3))


# ------------------------------------------------------------------------------------ painting


def _texture_fill(colour: tuple[float, float, float], texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    c = np.asarray(colour, dtype=np.float32)
    xi, yi = x.astype(int), y.astype(int)
    if texture == "plain":
        light = np.ones(x.shape, bool)
    elif texture == "striped":
        light = (yi // 2) % 2 == 0
    elif texture == "checked":
        light = ((xi // 2) + (yi // 2)) % 2 == 0
    else:
        raise ValueError(f"unknown texture {texture!r}; the world knows {TEXTURES}")
    return np.where(light[..., None], c, _DARK * c)


def _two_tone(a: tuple[float, float, float], b: tuple[float, float, float], which: np.ndarray) -> np.ndarray:
    return np.where(which[..., None], np.asarray(a, np.float32), np.asarray(b, np.float32))


# Novel styles: (shape, painter(thing, x, y) -> [32, width, 3] fill on pixel-centre coordinates x, y).
# Colours and patterns the base world lacks.
def _rings(t: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.hypot(x - t.cx, y - t.cy)
    return _two_tone((1.0, 0.55, 0.05), (0.97, 0.97, 0.97), (d // 2.2).astype(int) % 2 == 0)


def _frame(t: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    edge = np.maximum(np.abs(x - t.cx), np.abs(y - t.cy))
    return _two_tone((0.1, 0.9, 0.9), (0.85, 0.1, 0.75), edge >= 0.82 * t.r - 2.5)


def _zebra(t: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xi, yi = x.astype(int), y.astype(int)
    return _two_tone((0.55, 0.15, 0.85), (0.97, 0.97, 0.97), ((xi + yi) // 2) % 2 == 0)


def _split(t: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _two_tone((0.0, 0.62, 0.55), (1.0, 0.55, 0.7), t.cx > x)


def _core(t: Thing, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    centre = np.maximum(np.abs(x - t.cx), np.abs(y - t.cy)) <= 0.36 * t.r
    return _two_tone((0.95, 0.1, 0.1), (0.96, 0.96, 0.96), centre)


STYLES: dict[str, tuple[str, Callable[[Thing, np.ndarray, np.ndarray], np.ndarray]]] = {
    "rings": ("circle", _rings),  # orange and white concentric rings
    "frame": ("square", _frame),  # magenta with a cyan border
    "zebra": ("triangle", _zebra),  # purple and white diagonal stripes
    "split": ("circle", _split),  # teal left half, pink right half
    "core": ("cross", _core),  # white with a red centre
}


def _background(name: str, width: int = SIZE) -> np.ndarray:
    x, y = _grid(1, width)
    if name in _PLAIN_BG:
        return np.broadcast_to(np.asarray(_PLAIN_BG[name], np.float32), (SIZE, width, 3)).copy()
    if name == "grid":
        line = ((x.astype(int) % 8) < 2) | ((y.astype(int) % 8) < 2)  # 2 px: on the codec's grid
        return _two_tone((0.22, 0.22, 0.26), (0.08, 0.08, 0.10), line)
    if name == "gradient":  # corner to corner, whatever the width
        g = ((x / width + y / SIZE) / 2)[..., None].astype(np.float32)
        return (1 - g) * np.asarray((0.02, 0.02, 0.08), np.float32) + g * np.asarray((0.25, 0.12, 0.25), np.float32)
    raise ValueError(f"unknown background {name!r}; the world knows {BACKGROUNDS}")


def render(scene: Scene) -> np.ndarray:
    """[32, width, 3] float32 RGB in [0, 1]; later objects are painted over earlier ones."""
    width = scene.width
    img = _background(scene.background, width)
    x, y = _grid(1, width)
    for t in scene.things:
        if t.style is not None:
            if t.style not in STYLES:
                raise ValueError(f"unknown style {t.style!r}; the world knows {sorted(STYLES)}")
            fill = STYLES[t.style][1](t, x, y)
        else:
            if t.colour not in COLOURS:
                raise ValueError(f"unknown colour {t.colour!r}; the world knows {sorted(COLOURS)}")
            fill = _texture_fill(COLOURS[t.colour], t.texture, x, y)
        alpha = coverage(t.shape, t.cx, t.cy, t.r, width)[..., None]
        img = img * (1 - alpha) + fill * alpha
    return img.astype(np.float32)


# ------------------------------------------------------------------------------------ sampling


def _place(rng: np.random.Generator, r: float, lo: float = 0.0, hi: float = SIZE) -> tuple[float, float]:
    margin = r + 0.5
    return float(rng.uniform(lo + margin, hi - margin)), float(rng.uniform(margin, SIZE - margin))


def random_thing(rng: np.random.Generator, *, r_range: tuple[float, float] = (6.5, 11.0), style: str | None = None,
                 x_range: tuple[float, float] = (0.0, SIZE)) -> Thing:
    """A base object (or one in `style`) at a random place and size that fits in x_range."""
    r = float(rng.uniform(*r_range))
    cx, cy = _place(rng, r, *x_range)
    if style is not None:
        return Thing(shape=STYLES[style][0], style=style, cx=cx, cy=cy, r=r)
    return Thing(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 texture=TEXTURES[rng.integers(len(TEXTURES))], cx=cx, cy=cy, r=r)


def random_scene(rng: np.random.Generator, n_objects: int = 1, *, style: str | None = None) -> Scene:
    """One object anywhere, or two side by side (left one first in the caption, not overlapping)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if n_objects == 1:
        return Scene((random_thing(rng, style=style),), background)
    if n_objects == 2:
        left = random_thing(rng, r_range=(4.5, 7.5), x_range=(0.0, SIZE / 2))
        right = random_thing(rng, r_range=(4.5, 7.5), x_range=(SIZE / 2, SIZE))
        return Scene((left, right), background)
    raise ValueError("scenes hold one or two objects")


def wide_scene(rng: np.random.Generator, cells: int) -> Scene:
    """A canvas `cells` x 32 px wide with one base object per 32-px cell, each sized as a single
    object's (so every cell looks like a one-object picture); captioned left to right."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    things = tuple(
        dataclasses.replace(t, cx=t.cx + i * SIZE) for i, t in enumerate(random_thing(rng) for _ in range(cells)))
    return Scene(things, background, width=cells * SIZE)


def batch(seed: int, n: int, *, two_fraction: float = 0.0, style: str | None = None,
          cells: int = 1) -> tuple[np.ndarray, list[Scene]]:
    """n scenes from one seed: images [n, 32, 32 * cells, 3] in [0, 1] and the scenes (for
    captions/labels); `cells` > 1 gives wide canvases of one base object per cell."""
    rng = np.random.default_rng(seed)
    if cells > 1:
        if style is not None:
            raise ValueError("wide canvases hold base objects only")
        scenes = [wide_scene(rng, cells) for _ in range(n)]
    else:
        scenes = [random_scene(rng, 2 if rng.random() < two_fraction else 1, style=style) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


def attribute_labels(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Per single-object scene: shape, colour, texture indices (-1 for two-object or styled scenes)."""
    out = {"shape": [], "colour": [], "texture": []}
    for s in scenes:
        t = s.things[0]
        single = len(s.things) == 1 and t.style is None
        out["shape"].append(SHAPES.index(t.shape) if single else -1)
        out["colour"].append(list(COLOURS).index(t.colour) if single else -1)
        out["texture"].append(TEXTURES.index(t.texture) if single else -1)
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}
