"""Region specs for regionally controllable sampling, and their masks at every attn2 resolution.

One JSON form serves the UI, the infotext and the API, so a picture's regions can always be
restored from what was saved with it:

    {"regions": [{"prompt": "a <cat1> <cat2>", "negative": "blurry", "box": [0, 0, 512, 256]},
                 {"prompt": "a <dog1> <dog2>", "color": "#ff0000"}],
     "mask_image": "data:image/png;base64,...", "feather": 2}

- `box` is [top, left, bottom, right] as in the authors' scripts, in output pixels ("units":
  "px", the default) or in fractions of the image ("units": "fraction").
- `color` names one colour ("#rrggbb") of `mask_image`, a painted PNG (base64 or a data URL):
  one region per distinct non-black colour. Pixels of any colour no region names, black pixels
  and transparent pixels (alpha < 128) belong to no region. The mask covers the whole image at
  any resolution (nearest resampling; another aspect ratio stretches it), so a mask painted at
  512x512 still fits after the size sliders move, as fraction boxes do.
- Each region has exactly one of box / color. At most MAX_REGIONS regions; no regions at all
  means plain sampling with the global prompt.
- `feather` (latent pixels at the first pass's full latent resolution; 0 = hard edges as the
  authors) softens every region's edge with a separable Gaussian blur of that sigma.
- `loras` (per region): LoRAs applied only inside that region, `[{"name": "potter", "weight": 1}]`
  with names as in the Lora folder (file stems). A `<lora:name:weight>` tag in a region's prompt
  means the same (`Region.lora_refs` takes it out of the text, `Region.text` is what is encoded).
- `global_weight` (per spec, and per region to override it): how much of the global prompt is
  kept inside a region, in [0, 1]. 0 (the default) is the authors' behaviour: a region's prompt
  replaces the global one inside it; 0.3 keeps 30 % of the global attention there (Regional
  Prompter's "base ratio").
- `passes` (true/false, default false): each region with LoRAs is denoised in a UNet pass of its
  own and the predictions are blended by region (`regional.passes`), so no region's LoRA reaches
  another region; one pass per such region, plus one for the rest.
- `pass_unet_weight` (in [0, 1], default `PASS_UNET_WEIGHT`): with `passes`, the share of each
  region LoRA's weight that its UNet layers get inside its own pass; the cross-attention keys and
  values, which read the region's prompt, and the text encoder keep the full weight. The toy world
  places concepts best with a quarter (docs/results.md); 1 is a LoRA at its full weight everywhere.

The authors' textual form `[prompt]-*-[negative]-*-[top, left, bottom, right]|...` (`[]` = the
whole image) is read too (`parse_authors_spec`), so their example commands paste as they are.

Geometry. The latent is H/8 x W/8; every down level of the UNet halves with ceil (stride-2
conv, padding 1), and up levels come back to the same sizes (the host resizes skip connections),
so each attn2 layer sees the size `attention_sizes` gives for its family (SD1's 16 layers over
four levels, SDXL's 70 over levels 1 and 2). Boxes map to a feature map of size
(h, w) as rows ceil(t*h/H):floor(b*h/H), columns ceil(l*w/W):floor(r*w/W) (the authors' rule),
at every layer's own size, so a region covers exactly the cells it covers in their code; a box
may vanish at a coarse layer (it then simply has no effect there) but must cover at least one
latent cell. Painted and feathered masks are built at the latent resolution and area-averaged
down to each layer (`masks_for_layers`), giving fractional weights at coarse edges.

Hires fix: px boxes refer to the first-pass size. Pass it as `base_size` when building masks
for another size: boxes keep their fraction of the image and the feather radius is scaled with
the latent (the painted mask always covers the whole image).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lib_mos.models.family import SD1, ModelFamily
from lib_mos.prompt_tags import ExtraNetworkTag, replace_extra_network_tags

__all__ = [
    "LATENT_FACTOR",
    "MAX_FEATHER",
    "MAX_REGIONS",
    "LoraRef",
    "Region",
    "RegionError",
    "RegionSpec",
    "attention_sizes",
    "box_cells",
    "decode_mask_image",
    "layer_masks",
    "level_masks",
    "mask_colors",
    "masks_for_layers",
    "parse_authors_spec",
    "region_masks",
    "split_lora_tags",
]

MAX_REGIONS = 16  # regions per spec; each costs one extra attention per layer and row
MAX_FEATHER = 64.0  # latent pixels; beyond this every region is a faint wash over the image
# With `passes`, a region LoRA's UNet share in its own pass. The toy world's bench (32 pictures, 20
# steps) placed 2 / 3 concepts in 44% / 34% of pictures at 1, 100% / 94% at 0.25 (docs/results.md).
PASS_UNET_WEIGHT = 0.25
LATENT_FACTOR = 8

Units = Literal["px", "fraction"]
Box = tuple[float, float, float, float]
_BOX_FIELDS = ("top", "left", "bottom", "right")
_COLOR = re.compile(r"#[0-9a-f]{6}")
_REGION_KEYS = frozenset({"prompt", "negative", "box", "units", "color", "loras", "global_weight"})
_SPEC_KEYS = frozenset({"regions", "mask_image", "feather", "global_weight", "passes", "pass_unet_weight"})
_LORA_KEYS = frozenset({"name", "weight"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w=.+-]+)*);base64,", re.ASCII)


class RegionError(ValueError):
    """A region spec that cannot be used; the message names the region index and the field."""


def _where(index: int | None, name: str) -> str:
    return f"region {index}: field {name!r}" if index is not None else f"field {name!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Region:
    """One region: its prompt and negative, and where it is (a box, or a colour of the painted mask).

    box is [top, left, bottom, right] in `units` (output pixels, or fractions of the image).
    """

    prompt: str
    negative: str = ""
    box: Box | None = None
    units: Units = "px"
    color: str | None = None
    loras: tuple[LoraRef, ...] = ()
    global_weight: float | None = None  # None: the spec's

    def __post_init__(self) -> None:
        if isinstance(self.box, list):
            object.__setattr__(self, "box", tuple(self.box))
        if isinstance(self.color, str):
            object.__setattr__(self, "color", self.color.lower())
        if isinstance(self.loras, list):
            object.__setattr__(self, "loras", tuple(self.loras))
        self.check()
        if self.box is not None:
            object.__setattr__(self, "box", tuple(float(v) for v in self.box))

    def check(self, index: int | None = None) -> None:
        """Raise RegionError naming `index` and the field for anything unusable."""
        _check_region(self.prompt, self.negative, self.box, self.units, self.color, index)
        if not isinstance(self.loras, tuple) or not all(isinstance(ref, LoraRef) for ref in self.loras):
            raise RegionError(f"{_where(index, 'loras')} must be a list of LoRAs")
        if self.global_weight is not None:
            _check_global_weight(self.global_weight, index)
        self.lora_refs(index)  # tags in the prompt parse, and no LoRA is listed twice

    @property
    def text(self) -> str:
        """The prompt as it is encoded: without its `<lora:...>` tags."""
        return split_lora_tags(self.prompt)[0]

    def lora_refs(self, index: int | None = None) -> tuple[LoraRef, ...]:
        """Every LoRA of the region: the `loras` field, then the prompt's `<lora:name:w>` tags."""
        return _lora_refs(self.prompt, self.loras, index)

    def to_dict(self) -> dict[str, Any]:
        """JSON object with the defaults left out (infotext stays short)."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.negative:
            out["negative"] = self.negative
        if self.box is not None:
            out["box"] = [int(v) if float(v).is_integer() else float(v) for v in self.box]
            if self.units != "px":
                out["units"] = self.units
        if self.color is not None:
            out["color"] = self.color
        if self.loras:
            out["loras"] = [ref.to_dict() for ref in self.loras]
        if self.global_weight is not None:
            out["global_weight"] = _number_json(self.global_weight)
        return out

    @classmethod
    def from_dict(cls, data: Any, index: int) -> Region:
        """Strict: an object with known keys of the right types only."""
        if not isinstance(data, Mapping):
            raise RegionError(f"region {index}: must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - _REGION_KEYS)
        if unknown:
            raise RegionError(f"region {index}: unknown field {unknown[0]!r} (known: {sorted(_REGION_KEYS)})")
        if "prompt" not in data:
            raise RegionError(f"region {index}: field 'prompt' is missing")
        box = data.get("box")
        if box is not None and not isinstance(box, (list, tuple)):
            raise RegionError(f"{_where(index, 'box')} must be a list of 4 numbers, got {box!r}")
        color = data.get("color")
        if color is not None and not isinstance(color, str):
            raise RegionError(f"{_where(index, 'color')} must be '#rrggbb', got {color!r}")
        values = (
            data["prompt"],
            data.get("negative", ""),
            tuple(box) if box is not None else None,
            data.get("units", "px"),
            color.lower() if color is not None else None,
        )
        _check_region(*values, index)
        loras = data.get("loras", [])
        if not isinstance(loras, list):
            raise RegionError(f"{_where(index, 'loras')} must be a list of {{\"name\": ..., \"weight\": ...}}, "
                              f"got {loras!r}")
        refs = tuple(LoraRef.from_dict(item, index, j) for j, item in enumerate(loras))
        _lora_refs(values[0], refs, index)
        global_weight = data.get("global_weight")
        if global_weight is not None:
            _check_global_weight(global_weight, index)
            global_weight = float(global_weight)
        return cls(*values, loras=refs, global_weight=global_weight)


def _lora_refs(prompt: str, loras: tuple[LoraRef, ...], index: int | None) -> tuple[LoraRef, ...]:
    refs = loras + split_lora_tags(prompt, index)[1]
    seen: set[str] = set()
    for ref in refs:
        if ref.name in seen:
            raise RegionError(f"{_where(index, 'loras')}: LoRA {ref.name!r} is given twice (in 'loras' or as a "
                              "<lora:...> tag in the prompt); give it once")
        seen.add(ref.name)
    return refs


def _number_json(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _check_global_weight(value: Any, index: int | None) -> None:
    if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 1:
        raise RegionError(f"{_where(index, 'global_weight')} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA applied inside one region: its name in the Lora folder (the file's stem, as the host's
    `<lora:name>` names it) and its weight (the host's multiplier, for text encoder and UNet)."""

    name: str
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": _number_json(self.weight)}

    @classmethod
    def from_dict(cls, data: Any, index: int | None, j: int) -> LoraRef:
        where = _where(index, f"loras[{j}]")
        if not isinstance(data, Mapping):
            raise RegionError(f"{where} must be an object {{\"name\": ..., \"weight\": ...}}, got {data!r}")
        unknown = sorted(set(data) - _LORA_KEYS)
        if unknown:
            raise RegionError(f"{where}: unknown field {unknown[0]!r} (known: {sorted(_LORA_KEYS)})")
        return cls.checked(data.get("name"), data.get("weight", 1.0), where)

    @classmethod
    def checked(cls, name: Any, weight: Any, where: str) -> LoraRef:
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "<>:"):
            raise RegionError(f"{where}: 'name' must be a LoRA's name as in the Lora folder, got {name!r}")
        if not _is_number(weight) or not math.isfinite(weight):
            raise RegionError(f"{where}: the weight of LoRA {name!r} must be a number, got {weight!r}")
        return cls(name.strip(), float(weight))


def split_lora_tags(text: str, index: int | None = None) -> tuple[str, tuple[LoraRef, ...]]:
    """A region prompt without its `<lora:name>` / `<lora:name:weight>` tags, and those LoRAs (as
    the host takes such tags out of the main prompt). Other extra-network tags, and LoRA tags with
    separate text-encoder/UNet multipliers, are refused: a region applies one weight to both."""
    refs: list[LoraRef] = []

    def take(found: ExtraNetworkTag) -> str:
        args, tag = found.args, found.text
        if not found.is_lora:
            raise RegionError(f"{_where(index, 'prompt')}: {tag}: only <lora:name:weight> tags work in a region's prompt")
        if len(args) > 2 or any("=" in a for a in args):
            raise RegionError(f"{_where(index, 'prompt')}: {tag}: a region LoRA takes one weight, <lora:name:weight>")
        weight: Any = 1.0
        if len(args) == 2:
            try:
                weight = float(args[1])
            except ValueError:
                raise RegionError(f"{_where(index, 'prompt')}: {tag}: the weight {args[1]!r} is not a number") from None
        refs.append(LoraRef.checked(args[0], weight, f"{_where(index, 'prompt')}: {tag}"))
        return ""

    cleaned = replace_extra_network_tags(text, take)
    return (cleaned if refs else text), tuple(refs)


def _check_region(
    prompt: Any, negative: Any, box: Any, units: Any, color: Any, index: int | None
) -> None:
    """Every rule a region obeys, in one place, so direct construction and JSON agree."""
    if not isinstance(prompt, str):
        raise RegionError(f"{_where(index, 'prompt')} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RegionError(f"{_where(index, 'prompt')} is empty")
    if not isinstance(negative, str):
        raise RegionError(f"{_where(index, 'negative')} must be a string, got {type(negative).__name__}")
    if units not in ("px", "fraction"):
        raise RegionError(f"{_where(index, 'units')} must be 'px' or 'fraction', got {units!r}")
    if (box is None) == (color is None):
        raise RegionError(f"{_where(index, 'box')}: a region needs exactly one of 'box' and 'color'")
    if color is not None:
        if not isinstance(color, str) or not _COLOR.fullmatch(color):
            raise RegionError(f"{_where(index, 'color')} must be '#rrggbb', got {color!r}")
        if color == "#000000":
            raise RegionError(f"{_where(index, 'color')}: black is the mask's background, not a region")
        if units != "px":
            raise RegionError(f"{_where(index, 'units')} applies to boxes only")
        return
    if not isinstance(box, tuple) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise RegionError(f"{_where(index, 'box')} must be 4 numbers [top, left, bottom, right], got {box!r}")
    if not all(math.isfinite(v) for v in box):
        raise RegionError(f"{_where(index, 'box')} has a non-finite value: {list(box)}")
    top, left, bottom, right = box
    if min(box) < 0:
        raise RegionError(f"{_where(index, 'box')} {list(box)} lies outside the image (negative)")
    if units == "fraction" and max(box) > 1:
        raise RegionError(f"{_where(index, 'box')} {list(box)} lies outside the image (fraction > 1)")
    if top >= bottom:
        raise RegionError(f"{_where(index, 'box')} {list(box)}: top must be less than bottom")
    if left >= right:
        raise RegionError(f"{_where(index, 'box')} {list(box)}: left must be less than right")


@dataclass(frozen=True)
class RegionSpec:
    """Everything about the regions of one generation; `to_json`/`from_json` is the one exchange form.

    mask_image: PNG as base64 (or a data URL) of a colour-coded painted mask, one region per
    distinct non-black colour. feather: in latent pixels at full latent resolution, 0 = hard edges.
    """

    regions: tuple[Region, ...] = ()
    mask_image: str | None = None
    feather: float = 0.0
    global_weight: float = 0.0
    passes: bool = False
    pass_unet_weight: float = PASS_UNET_WEIGHT

    def __post_init__(self) -> None:
        if not isinstance(self.regions, (list, tuple)):
            raise RegionError(f"field 'regions' must be a list, got {type(self.regions).__name__}")
        object.__setattr__(self, "regions", tuple(self.regions))
        if len(self.regions) > MAX_REGIONS:
            raise RegionError(f"field 'regions': {len(self.regions)} regions, at most {MAX_REGIONS} are supported")
        for i, region in enumerate(self.regions):
            if not isinstance(region, Region):
                raise RegionError(f"region {i}: must be a Region, got {type(region).__name__}")
            region.check(i)
        if not _is_number(self.feather) or not math.isfinite(self.feather):
            raise RegionError(f"field 'feather' must be a finite number, got {self.feather!r}")
        if not 0 <= self.feather <= MAX_FEATHER:
            raise RegionError(f"field 'feather' must be in [0, {MAX_FEATHER:g}] latent pixels, got {self.feather}")
        _check_global_weight(self.global_weight, None)
        if not isinstance(self.passes, bool):
            raise RegionError(f"field 'passes' must be true or false, got {self.passes!r}")
        if not _is_number(self.pass_unet_weight) or not 0 <= self.pass_unet_weight <= 1:
            raise RegionError(f"field 'pass_unet_weight' must be a number in [0, 1], got {self.pass_unet_weight!r}")
        colors = [(i, r.color) for i, r in enumerate(self.regions) if r.color is not None]
        seen: dict[str, int] = {}
        for i, color in colors:
            if color in seen:
                raise RegionError(f"region {i}: field 'color' {color} is already used by region {seen[color]}")
            seen[color] = i
            if self.mask_image is None:
                raise RegionError(f"region {i}: field 'color' needs a painted 'mask_image'")
        if self.mask_image is not None:
            if not isinstance(self.mask_image, str):
                raise RegionError(f"field 'mask_image' must be a base64 PNG string, got {type(self.mask_image).__name__}")
            decode_mask_image(self.mask_image)  # fail now, not in the middle of a generation
            if not colors:
                raise RegionError("field 'mask_image' is given but no region names one of its colours")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"regions": [r.to_dict() for r in self.regions]}
        if self.mask_image is not None:
            out["mask_image"] = self.mask_image
        if self.feather:
            out["feather"] = _number_json(self.feather)
        if self.global_weight:
            out["global_weight"] = _number_json(self.global_weight)
        if self.passes:
            out["passes"] = True
        if self.pass_unet_weight != PASS_UNET_WEIGHT:
            out["pass_unet_weight"] = _number_json(self.pass_unet_weight)
        return out

    def global_weights(self) -> list[float]:
        """Each region's share of the global prompt inside it (its own, else the spec's)."""
        return [self.global_weight if r.global_weight is None else r.global_weight for r in self.regions]

    def to_json(self) -> str:
        """Compact JSON; `from_json(spec.to_json()) == spec`."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> RegionSpec:
        """Parse our JSON (text or an already decoded object), or the authors' textual form.

        Strict: unknown keys, duplicate keys, wrong types, NaN/Infinity and impossible boxes raise
        RegionError naming the region index and the field.
        """
        if isinstance(data, str):
            text = data.strip()
            if not text.startswith("{"):
                return parse_authors_spec(text)
            data = _loads_strict(text)
        if not isinstance(data, Mapping):
            raise RegionError(f"a region spec must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _SPEC_KEYS)
        if unknown:
            raise RegionError(f"unknown field {unknown[0]!r} (known: {sorted(_SPEC_KEYS)})")
        regions = data.get("regions")
        if not isinstance(regions, list):
            raise RegionError(f"field 'regions' must be a list, got {type(regions).__name__}")
        if len(regions) > MAX_REGIONS:
            raise RegionError(f"field 'regions': {len(regions)} regions, at most {MAX_REGIONS} are supported")
        feather = data.get("feather", 0.0)
        if not _is_number(feather):
            raise RegionError(f"field 'feather' must be a number, got {feather!r}")
        global_weight = data.get("global_weight")
        global_weight = 0.0 if global_weight is None else global_weight  # null: not set, as in a region
        _check_global_weight(global_weight, None)
        return cls(
            regions=tuple(Region.from_dict(r, i) for i, r in enumerate(regions)),
            mask_image=data.get("mask_image"),
            feather=float(feather),
            global_weight=float(global_weight),
            passes=data.get("passes", False),
            pass_unet_weight=data.get("pass_unet_weight", PASS_UNET_WEIGHT),
        )


def _loads_strict(text: str) -> Any:
    def no_constants(name: str) -> Any:
        raise RegionError(f"{name} is not a number a region spec accepts")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise RegionError(f"field {key!r} appears twice")
            out[key] = value
        return out

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise RegionError(f"not valid JSON: {exc}") from None


# ---------------------------------------------------------------------------- the authors' form


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside square brackets: prompts may hold the host's [a|b] syntax."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _bracketed(text: str, index: int, name: str) -> str:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise RegionError(f"{_where(index, name)} must be written [like this], got {text[:40]!r}")
    return text[1:-1].strip()


def parse_authors_spec(text: str) -> RegionSpec:
    """`[prompt]-*-[negative]-*-[top, left, bottom, right]` per region, joined by `|`; `[]` as the
    position is the whole image. Positions are output pixels, read as JSON numbers (never eval'd)."""
    segments = _split_top_level(text.strip(), "|")
    if segments and not segments[-1].strip():
        segments.pop()  # a trailing "|" as the authors' scripts allow
    regions = []
    for i, segment in enumerate(segments):
        if len(regions) >= MAX_REGIONS:
            raise RegionError(f"field 'regions': {len(segments)} regions, at most {MAX_REGIONS} are supported")
        parts = _split_top_level(segment, "-*-")
        if len(parts) != 3:
            raise RegionError(
                f"region {i}: expected [prompt]-*-[negative]-*-[top, left, bottom, right], got {segment.strip()[:60]!r}"
            )
        prompt, negative = _bracketed(parts[0], i, "prompt"), _bracketed(parts[1], i, "negative")
        try:
            pos = _loads_strict(parts[2].strip())
        except RegionError as exc:
            raise RegionError(f"{_where(i, 'box')}: {exc}") from None
        if not isinstance(pos, list):
            raise RegionError(f"{_where(i, 'box')} must be [top, left, bottom, right] or [], got {parts[2].strip()!r}")
        if pos:
            region = Region.from_dict({"prompt": prompt, "negative": negative, "box": pos}, i)
        else:
            region = Region(prompt=prompt, negative=negative, box=(0.0, 0.0, 1.0, 1.0), units="fraction")
        regions.append(region)
    return RegionSpec(regions=tuple(regions))


# ------------------------------------------------------------------------------------- painted masks


def decode_mask_image(text: str):  # -> PIL.Image.Image (PIL imported lazily with the rest)
    """The painted mask as a lazily loaded PIL image; only PNG (lossless colours) is accepted."""
    from PIL import Image

    payload = text.strip()
    match = _DATA_URL.match(payload)
    if match:
        if match.group(1) not in (None, "image/png"):
            raise RegionError(f"field 'mask_image' must be a PNG, got a {match.group(1)} data URL")
        payload = payload[match.end():]
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RegionError(f"field 'mask_image' is not valid base64: {exc}") from None
    if not raw.startswith(_PNG_SIGNATURE):
        raise RegionError("field 'mask_image' is not a PNG image")
    try:
        return Image.open(io.BytesIO(raw), formats=["PNG"])
    except Exception as exc:
        raise RegionError(f"field 'mask_image' is not a readable PNG: {exc}") from None


def _mask_pixels(text: str) -> np.ndarray:
    """[H, W] int32 0xRRGGBB per pixel; transparent (alpha < 128) pixels become black."""
    image = decode_mask_image(text)
    try:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.int32)
    except Exception as exc:
        raise RegionError(f"field 'mask_image' could not be decoded: {exc}") from None
    rgb = (rgba[..., 0] << 16) | (rgba[..., 1] << 8) | rgba[..., 2]
    return np.where(rgba[..., 3] >= 128, rgb, 0)


def mask_colors(mask_image: str) -> list[str]:
    """Distinct non-black colours of a painted mask, most pixels first (to offer one region each)."""
    pixels = _mask_pixels(mask_image)
    values, counts = np.unique(pixels[pixels != 0], return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], values[i]))
    return [f"#{int(values[i]):06x}" for i in order]


def _nearest(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest resample: cell (i, j) takes the source pixel under its centre."""
    src_h, src_w = pixels.shape
    rows = ((2 * np.arange(h) + 1) * src_h) // (2 * h)
    cols = ((2 * np.arange(w) + 1) * src_w) // (2 * w)
    return pixels[rows][:, cols]


# --------------------------------------------------------------------------------------- geometry


def _check_size(width: int, height: int, what: str) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % LATENT_FACTOR:
            raise RegionError(f"{what} {name} must be a positive multiple of {LATENT_FACTOR}, got {value!r}")


def attention_sizes(width: int, height: int, family: ModelFamily = SD1) -> list[tuple[int, int]]:
    """(h, w) of the feature map each attn2 layer of `family` sees, in its order (N = h * w)."""
    _check_size(width, height, "image")
    return family.attention_sizes(width, height, LATENT_FACTOR)


def _exact(value: float) -> Fraction:
    """The number as written (0.1 is 1/10), so boundaries land where the user put them."""
    return Fraction(repr(float(value)))


def _fraction_box(region: Region, index: int, base_width: int, base_height: int) -> tuple[Fraction, ...]:
    """The box as exact fractions of the image (px boxes checked against the first-pass size)."""
    top, left, bottom, right = (_exact(v) for v in region.box)
    if region.units == "fraction":
        return top, left, bottom, right
    if bottom > base_height or right > base_width:
        raise RegionError(
            f"{_where(index, 'box')} {list(region.box)} lies outside the {base_width}x{base_height} image"
        )
    return top / base_height, left / base_width, bottom / base_height, right / base_width


_SNAP = Fraction(1, 10**9)


def _ceil(x: Fraction) -> int:
    """ceil, but a value within 1e-9 of an integer is that integer (1/3 written as 0.3333333333333333
    lands where 1/3 does)."""
    nearest = round(x)
    return nearest if abs(x - nearest) <= _SNAP else math.ceil(x)


def _floor(x: Fraction) -> int:
    nearest = round(x)
    return nearest if abs(x - nearest) <= _SNAP else math.floor(x)


def box_cells(box: tuple[Fraction, ...], h: int, w: int) -> tuple[int, int, int, int]:
    """Rows r0:r1 and columns c0:c1 a fractional box covers on an (h, w) map: the authors' rule
    ceil(top*h):floor(bottom*h), ceil(left*w):floor(right*w); may be empty."""
    top, left, bottom, right = box
    return _ceil(top * h), _floor(bottom * h), _ceil(left * w), _floor(right * w)


def _box_mask(box: tuple[Fraction, ...], h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(h, w)
    r0, r1, c0, c1 = box_cells(box, h, w)
    mask[r0:r1, c0:c1] = 1.0
    return mask


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def _feather(masks: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders (a region touching the border stays full
    there), clipped to [0, 1]; sigma 0 leaves that axis untouched."""
    out = masks.unsqueeze(1)  # [K, 1, h, w]
    if sigma_y > 0:
        k = _gaussian_kernel(sigma_y)
        r = len(k) // 2
        out = F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    if sigma_x > 0:
        k = _gaussian_kernel(sigma_x)
        r = len(k) // 2
        out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return out.squeeze(1).clamp(0.0, 1.0)


def _sizes(width: int, height: int, base_size: tuple[int, int] | None) -> tuple[int, int]:
    _check_size(width, height, "image")
    base_width, base_height = base_size if base_size is not None else (width, height)
    _check_size(base_width, base_height, "first-pass")
    return base_width, base_height


def _hard_masks(spec: RegionSpec, width: int, height: int, base_width: int, base_height: int) -> torch.Tensor:
    """[K, H/8, W/8] unfeathered masks; a region that covers no latent cell is an error."""
    h0, w0 = height // LATENT_FACTOR, width // LATENT_FACTOR
    masks = torch.zeros(len(spec.regions), h0, w0)
    pixels = None
    for i, region in enumerate(spec.regions):
        if region.box is not None:
            masks[i] = _box_mask(_fraction_box(region, i, base_width, base_height), h0, w0)
            if not masks[i].any():
                raise RegionError(
                    f"{_where(i, 'box')} {list(region.box)} covers no cell of the {w0}x{h0} latent "
                    f"(a region must span at least {LATENT_FACTOR} px each way)"
                )
        else:
            if pixels is None:
                pixels = _nearest(_mask_pixels(spec.mask_image), h0, w0)
            masks[i] = torch.from_numpy(pixels == int(region.color[1:], 16)).float()
            if not masks[i].any():
                raise RegionError(f"{_where(i, 'color')} {region.color} covers no cell of the {w0}x{h0} latent")
    return masks


def region_masks(
    spec: RegionSpec, width: int, height: int, *, base_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """[K, H/8, W/8] float masks in [0, 1] at the latent resolution, feathered as the spec says.

    base_size (width, height) is the first-pass size px boxes refer to (hires fix); default: this
    size.
    """
    base_width, base_height = _sizes(width, height, base_size)
    masks = _hard_masks(spec, width, height, base_width, base_height)
    if spec.feather > 0 and len(spec.regions):
        masks = _feather(masks, spec.feather * height / base_height, spec.feather * width / base_width)
    return masks


def _pool_factor(full: int, size: int) -> int:
    """The power of two f with ceil(full / f) == size (the UNet's ceil halving)."""
    f = 1
    while -(-full // f) > size:
        f *= 2
    if -(-full // f) != size:
        raise ValueError(f"{size} is not {full} halved with ceil any number of times")
    return f


def masks_for_layers(latent_masks: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """[K, h*w] per size: the mean of the latent cells each feature cell stands for.

    A cell at a level halved k times covers the 2^k x 2^k latent block at its position, clipped at
    the bottom/right edge where the size was rounded up (avg_pool with ceil_mode counts only the
    cells inside). Layers of equal size share one tensor.
    """
    if latent_masks.dim() != 3:
        raise ValueError(f"latent masks must be [K, h, w], got {tuple(latent_masks.shape)}")
    k, h0, w0 = latent_masks.shape
    if k == 0:  # no regions: empty masks of the right sizes (pooling cannot take 0 channels)
        return [latent_masks.new_zeros(0, h * w) for h, w in sizes]
    cache: dict[tuple[int, int], torch.Tensor] = {}
    out = []
    for h, w in sizes:
        if (h, w) not in cache:
            fy, fx = _pool_factor(h0, h), _pool_factor(w0, w)
            pooled = latent_masks
            if (fy, fx) != (1, 1):
                pooled = F.avg_pool2d(latent_masks.unsqueeze(0), (fy, fx), (fy, fx), ceil_mode=True)[0]
            cache[(h, w)] = pooled.reshape(k, h * w).contiguous()
        out.append(cache[(h, w)])
    return out


def level_masks(
    spec: RegionSpec, width: int, height: int, *, base_size: tuple[int, int] | None = None,
    family: ModelFamily = SD1,
) -> dict[tuple[int, int], torch.Tensor]:
    """(h, w) -> [K, h*w] masks at every level of `family`'s UNet for an image of width x height
    (region LoRAs act at every level, attention only at some: SDXL has none at level 0).

    Without feathering, boxes are mapped with the authors' ceil/floor rule at each level's own
    size (hard 0/1, exactly their cells); painted and feathered masks are area-averaged from the
    latent (`masks_for_layers`).
    """
    base_width, base_height = _sizes(width, height, base_size)
    sizes = list(dict.fromkeys(family.level_sizes(width, height, LATENT_FACTOR)))
    latent = region_masks(spec, width, height, base_size=base_size)  # validates every region
    pooled = dict(zip(sizes, masks_for_layers(latent, sizes)))
    if spec.feather > 0:
        return pooled
    boxes = {
        i: _fraction_box(r, i, base_width, base_height) for i, r in enumerate(spec.regions) if r.box is not None
    }
    for (h, w), masks in pooled.items():
        if boxes:
            exact = masks.clone()
            for i, box in boxes.items():
                exact[i] = _box_mask(box, h, w).reshape(-1)
            pooled[(h, w)] = exact
    return pooled


def layer_masks(
    spec: RegionSpec, width: int, height: int, *, base_size: tuple[int, int] | None = None,
    family: ModelFamily = SD1,
) -> list[torch.Tensor]:
    """[K, h*w] mask per attn2 layer (in `family`'s order) for an image of width x height: the
    `level_masks` of each layer's level (layers of equal size share one tensor)."""
    levels = level_masks(spec, width, height, base_size=base_size, family=family)
    return [levels[size] for size in attention_sizes(width, height, family)]
