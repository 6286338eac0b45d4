"""Training data of an ED-LoRA concept: a folder of images becomes `TrainingImage`s (picture,
caption, optional subject mask), `augment_view` makes the authors' augmented views of one, and
`make_caption` the caption of a training step from the authors' kind of caption templates.

No WebUI import: the trainer and its tests use this without the host.

Folder layouts (files are matched by name stem; hidden files are skipped):
- flat: `photo.jpg`, caption `photo.txt`, mask `photo_mask.png` (or `photo.png` when the picture
  itself is not a PNG). Subfolders and files of other kinds (`.json`, ...) are ignored.
- the authors': `image/photo.jpg`, `mask/photo.png` (or `mask/photo_mask.png`), `caption/photo.txt`.

Every problem is a `TrainingDataError` naming the file, what is wrong and how to fix it, and
reading stops at the first problem in file-name order: a user with forty pictures gets one clear
message, not a traceback from the middle of training.

Choices:
- Pictures are shown as a viewer shows them: EXIF orientation is applied (to masks too) before
  the size checks. Transparent pixels are composited on black, the colour of the canvas the
  augmentation pastes on, so what was invisible never becomes training signal.
- A mask is greyscale (mode "L", colour masks converted by luminance); a pixel at least half white
  (>= 128) is subject. A mask with no such pixel is refused: it would make the masked loss empty.
- Captions are UTF-8 (a BOM is dropped). A caption must hold the placeholder; one that does not
  gets the first whole-word, case-insensitive occurrence of the class word replaced by it.
- `augment_view` resamples each picture once: the short-edge resize, crop and long-edge resize of
  the authors' `HumanResizeCropFinalV3` are composed into one source box, cut out and resized with
  Lanczos (the mask with bilinear, then thresholded at half), so mask and picture stay aligned to
  the pixel and nothing is blurred twice.
- Latent-size masks (S/8) are 8x8 area averages kept as floats in [0, 1], not binarised: a subject
  thinner than 8 pixels still counts, and edge cells weigh the loss by how much they are covered.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_SUFFIXES",
    "PLACEHOLDER",
    "TEMPLATES",
    "TrainingDataError",
    "TrainingImage",
    "TrainingView",
    "augment_view",
    "make_caption",
    "read_training_folder",
]

PLACEHOLDER = "<TOK>"  # where the concept's tokens (or trigger words) go in a caption
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # compared lower-cased
MASK_THRESHOLD = 128  # mask pixels at least this white are subject
_MASK_SUFFIX = "_mask"  # flat layout: `<stem>_mask.png` (any case)
_AUTHORS_DIRS = ("image", "mask", "caption")

# Caption templates: `{}` is the caption (placeholder already in it). Our own wording.
TEMPLATES: dict[str, list[str]] = {
    "human": [
        "a photo of {}",
        "a close-up photo of {}",
        "a portrait photo of {}",
        "a candid snapshot of {}",
        "a headshot of {}",
        "a full-body picture of {}",
        "a picture of {} looking at the camera",
        "a bright photo of {}",
        "a dim photo of {}",
        "a cropped photo of {}",
        "a sharp photo of {}",
        "an old photograph of {}",
        "a studio portrait of {}",
        "a photo of {} outdoors",
        "a selfie of {}",
    ],
    "object": [
        "a photo of {}",
        "a close-up photo of {}",
        "a photo of the {}",
        "a product shot of {}",
        "a picture of {} on a table",
        "a well-lit photo of {}",
        "a dark photo of {}",
        "a blurry photo of {}",
        "a cropped picture of {}",
        "a photo of a small {}",
        "a photo of a large {}",
        "a photo of {} seen from above",
        "a photo of {} from the side",
        "a snapshot of {} indoors",
        "a detailed photo of {}",
    ],
    "style": [
        "a painting in the style of {}",
        "an illustration in the style of {}",
        "a drawing in the style of {}",
        "a sketch in the style of {}",
        "a landscape in the style of {}",
        "a portrait in the style of {}",
        "a picture of a city in the style of {}",
        "a still life in the style of {}",
        "artwork in the style of {}",
        "a colourful picture in the style of {}",
        "a detailed rendering in the style of {}",
        "a poster in the style of {}",
    ],
    "none": ["{}"],
}


class TrainingDataError(ValueError):
    """A training folder problem; the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class TrainingImage:
    """One training picture as read: oriented RGB, its caption (always holding the placeholder)
    and its subject mask (mode "L", the picture's size) when it has one."""

    path: Path
    image: Image.Image
    caption: str
    mask: Image.Image | None = None


@dataclass
class TrainingView:
    """One augmented view at resolution S: what the VAE encodes and the latent-size masks."""

    pixels: torch.Tensor  # [3, S, S] float32 in [-1, 1]; black canvas outside the pasted picture
    image_area: torch.Tensor  # [1, S/8, S/8] float32: covered fraction of the pasted picture
    subject: torch.Tensor | None  # [1, S/8, S/8] float32: covered fraction of the subject, or None


# ----------------------------------------------------------------------------------- reading


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden plain files of `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)


@dataclass(frozen=True)
class _Listing:
    """A folder's visible files in name order, the pictures among them and its captions by name stem."""

    files: list[Path]
    pictures: list[Path]
    captions: dict[str, Path]


def _listing(folder: Path) -> _Listing:
    """The one walk of a folder that every layout's reader uses, so both layouts see the same files;
    all empty for a folder that is not there (the authors' mask/ and caption/ are optional)."""
    files = _visible_files(folder) if folder.is_dir() else []
    return _Listing(files, [p for p in files if _is_image_name(p)],
                    {p.stem: p for p in files if p.suffix.lower() == ".txt"})


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited on black (the augmentation's canvas colour)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def _open_oriented(path: Path, what: str) -> Image.Image:
    """The file's pixels as a viewer shows them (EXIF orientation applied), fully loaded."""
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Exception as e:  # PIL raises many kinds for broken files; all mean the same to a user
        raise TrainingDataError(f"{path}: cannot read this {what} ({type(e).__name__}: {e}); re-save it as a "
                                "PNG or JPEG, or remove it") from e


def _read_image(path: Path, min_side: int) -> Image.Image:
    image = _to_rgb(_open_oriented(path, "image"))
    w, h = image.size
    if min(w, h) < min_side:
        raise TrainingDataError(f"{path}: the image is {w}x{h} pixels; its shorter side must be at least {min_side} "
                                "pixels: use a larger picture or remove it")
    return image


def _class_pattern(class_word: str) -> re.Pattern[str]:
    """The class word as a whole word (words of a multi-word class separated by any spaces)."""
    body = r"\s+".join(re.escape(w) for w in class_word.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _read_caption(path: Path | None, class_word: str | None, placeholder: str) -> str:
    if path is None:
        return placeholder
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{path}: the caption is not UTF-8 text; save it with UTF-8 encoding") from e
    except OSError as e:
        raise TrainingDataError(f"{path}: cannot read this caption ({e})") from e
    if not text:
        raise TrainingDataError(f"{path}: the caption is empty; write a caption with {placeholder} where the "
                                "concept goes, or delete the file (the caption is then just the concept)")
    if placeholder in text:
        return text
    if class_word:
        replaced, n = _class_pattern(class_word).subn(lambda _: placeholder, text, count=1)
        if n:
            return replaced
        hint = f"put {placeholder} or the class word {class_word!r} where the concept goes"
    else:
        hint = f"put {placeholder} where the concept goes (or set a class word to be replaced)"
    raise TrainingDataError(f"{path}: caption has no place for the concept: {hint}")


def _read_mask(path: Path, image_path: Path, size: tuple[int, int]) -> Image.Image:
    mask = _open_oriented(path, "mask").convert("L")
    if mask.size != size:
        raise TrainingDataError(f"{path}: the mask is {mask.size[0]}x{mask.size[1]} pixels but its image "
                                f"{image_path.name} is {size[0]}x{size[1]} (after EXIF rotation); make the mask "
                                "exactly the image's size")
    if mask.getextrema()[1] < MASK_THRESHOLD:
        raise TrainingDataError(f"{path}: the mask marks no subject (no pixel is at least half white); paint the "
                                "subject white on black, or delete the mask")
    return mask


@dataclass
class _Planned:
    """One image with the caption and mask files that belong to it."""

    image: Path
    caption: Path | None
    masks: list[Path]


def _load(planned: _Planned, class_word: str | None, placeholder: str, min_side: int) -> TrainingImage:
    image = _read_image(planned.image, min_side)
    caption = _read_caption(planned.caption, class_word, placeholder)
    mask = None
    if len(planned.masks) > 1:
        names = " and ".join(p.name for p in planned.masks)
        raise TrainingDataError(f"{planned.masks[1]}: image {planned.image.name} has two masks ({names}); keep one")
    if planned.masks:
        mask = _read_mask(planned.masks[0], planned.image, image.size)
    return TrainingImage(path=planned.image, image=image, caption=caption, mask=mask)


def _collect(pictures: Iterable[Path], captions: Mapping[str, Path], masks: Mapping[str, list[Path]],
             class_word: str | None, placeholder: str, min_side: int) -> list[TrainingImage]:
    """Each picture loaded with the caption and masks of its name stem, one at a time in the order
    given, so that the first problem in that order is the one reported (`pictures` may be a generator
    that checks the other files as it goes). A second picture with a stem already seen is refused:
    its caption and mask could not be told apart."""
    items: list[TrainingImage] = []
    seen: dict[str, Path] = {}
    for p in pictures:
        if p.stem in seen:
            raise TrainingDataError(f"{p}: another image has the same name stem ({seen[p.stem].name}); captions "
                                    "and masks are matched by stem, so rename or remove one of them")
        seen[p.stem] = p
        items.append(_load(_Planned(p, captions.get(p.stem), masks.get(p.stem, [])), class_word, placeholder,
                           min_side))
    return items


def _mask_base(name_stem: str) -> str | None:
    """`photo` for `photo_mask` (any case), else None."""
    if name_stem.lower().endswith(_MASK_SUFFIX) and len(name_stem) > len(_MASK_SUFFIX):
        return name_stem[: -len(_MASK_SUFFIX)]
    return None


def _read_flat(folder: Path, class_word: str | None, placeholder: str, min_side: int) -> list[TrainingImage]:
    listing = _listing(folder)
    files, pictures, captions = listing.files, listing.pictures, listing.captions
    non_png_stems = {p.stem for p in pictures if p.suffix.lower() != ".png"}
    masks: dict[str, list[Path]] = {}  # image stem -> mask files
    mask_files = set()
    for p in pictures:
        if p.suffix.lower() != ".png":
            continue
        base = _mask_base(p.stem)
        if base is not None:
            masks.setdefault(base, []).append(p)
            mask_files.add(p)
        elif p.stem in non_png_stems:
            masks.setdefault(p.stem, []).append(p)
            mask_files.add(p)
    image_stems = {p.stem for p in pictures if p not in mask_files}

    def images_in_order() -> Iterator[Path]:
        """The images among the files, a mask or caption without an image refused where it comes."""
        for p in files:
            if p in mask_files:
                base = _mask_base(p.stem) or p.stem
                if base not in image_stems:
                    raise TrainingDataError(f"{p}: this mask has no image (looked for {base} with one of "
                                            f"{_suffix_list()}); add the image or remove the mask")
            elif _is_image_name(p):
                yield p
            elif p.suffix.lower() == ".txt" and p.stem not in image_stems:
                raise TrainingDataError(f"{p}: this caption has no image (looked for {p.stem} with one of "
                                        f"{_suffix_list()}); add the image or remove the caption")

    items = _collect(images_in_order(), captions, masks, class_word, placeholder, min_side)
    if not items:
        raise TrainingDataError(f"{folder}: no training images in this folder (accepted: {_suffix_list()}, any case; "
                                "or the subfolders image/, mask/, caption/); add pictures of the concept")
    return items


def _read_authors(folder: Path, class_word: str | None, placeholder: str, min_side: int) -> list[TrainingImage]:
    stray = _listing(folder).pictures
    if stray:
        raise TrainingDataError(f"{stray[0]}: this folder has an image/ subfolder, so images beside it are not read; "
                                "move it into image/ (or use only the flat layout)")
    image_dir, mask_dir, caption_dir = (folder / d for d in _AUTHORS_DIRS)
    pictures = _listing(image_dir).pictures
    stems = {p.stem for p in pictures}
    captions = _listing(caption_dir).captions
    mask_list = _listing(mask_dir).pictures
    masks: dict[str, list[Path]] = {}
    for p in mask_list:
        base = p.stem if p.stem in stems else (_mask_base(p.stem) or p.stem)
        masks.setdefault(base, []).append(p)

    items = _collect(pictures, captions, masks, class_word, placeholder, min_side)
    if not items:
        raise TrainingDataError(f"{image_dir}: no training images in this folder (accepted: {_suffix_list()}, any "
                                "case); add pictures of the concept")
    for stem, p in sorted(captions.items(), key=lambda kv: kv[1].name):
        if stem not in stems:
            raise TrainingDataError(f"{p}: this caption has no image (looked for image/{stem} with one of "
                                    f"{_suffix_list()}); add the image or remove the caption")
    for p in mask_list:
        if p.suffix.lower() != ".png":
            raise TrainingDataError(f"{p}: masks must be PNG files (lossless); re-save it as {p.stem}.png")
        base = p.stem if p.stem in stems else _mask_base(p.stem)
        if base not in stems:
            raise TrainingDataError(f"{p}: this mask has no image (looked for image/{base or p.stem} with one of "
                                    f"{_suffix_list()}); add the image or remove the mask")
    return items


def read_training_folder(folder: str | Path, *, class_word: str | None = None, placeholder: str = PLACEHOLDER,
                         min_side: int = 64) -> list[TrainingImage]:
    """The folder's training images, sorted by file name; the first problem raises
    `TrainingDataError` (see the module docstring for the layouts and rules)."""
    if not placeholder:
        raise ValueError("placeholder must be a non-empty string")
    root = Path(folder).expanduser().absolute()
    if not root.exists():
        raise TrainingDataError(f"{root}: the training folder does not exist; check the path")
    if not root.is_dir():
        raise TrainingDataError(f"{root}: this is a file, not a folder; give the folder that holds the images")
    class_word = (class_word or "").strip() or None
    if (root / "image").is_dir():
        return _read_authors(root, class_word, placeholder, min_side)
    return _read_flat(root, class_word, placeholder, min_side)


# ------------------------------------------------------------------------------ augmentation


def _latent(mask: np.ndarray) -> torch.Tensor:
    """[S, S] {0, 1} -> [1, S/8, S/8] float32 covered fractions (8x8 area average)."""
    return F.avg_pool2d(torch.from_numpy(mask)[None, None], 8)[0]


def augment_view(item: TrainingImage, resolution: int, rng: random.Random, *, crop_p: float = 0.5,
                 flip_p: float = 0.0) -> TrainingView:
    """One view as the authors' `HumanResizeCropFinalV3` makes it: short edge to S; with
    probability `crop_p` a crop (portrait: the top rows, height in [S, h]; otherwise a random
    S x S square); long edge to S; pasted at a random place on a black S x S canvas; with
    probability `flip_p` mirrored. Every draw comes from `rng`, in a fixed order."""
    size = resolution
    if not isinstance(size, int) or isinstance(size, bool) or size < 8 or size % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution!r}")
    for name, p in (("crop_p", crop_p), ("flip_p", flip_p)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability (0..1), got {p!r}")
    w, h = item.image.size
    # step 1, short edge to S: a frame of fw x fh pixels (nothing is resampled yet)
    fw, fh = (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)
    left, top, right, bottom = 0, 0, fw, fh
    # step 2, crop in the frame
    if rng.random() < crop_p:
        if fh > fw:  # portrait: keep the top (where a person's face is), height in [S, fh]
            bottom = fw + rng.randint(0, fh - fw)
        else:
            top = rng.randint(0, fh - size)
            left = rng.randint(0, fw - size)
            right, bottom = left + size, top + size
    # step 3, long edge to S
    cw, ch = right - left, bottom - top
    pw, ph = (size, max(1, round(ch * size / cw))) if cw >= ch else (max(1, round(cw * size / ch)), size)
    # the crop in source pixels (products first: the full frame maps exactly onto the image)
    box = (left * w / fw, top * h / fh, right * w / fw, bottom * h / fh)
    y0 = rng.randint(0, size - ph)
    x0 = rng.randint(0, size - pw)
    flip = rng.random() < flip_p

    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[y0:y0 + ph, x0:x0 + pw] = np.asarray(item.image.resize((pw, ph), Image.Resampling.LANCZOS, box=box))
    area = np.zeros((size, size), np.float32)
    area[y0:y0 + ph, x0:x0 + pw] = 1
    subject = None
    if item.mask is not None:
        mask = np.asarray(item.mask.resize((pw, ph), Image.Resampling.BILINEAR, box=box)) >= MASK_THRESHOLD
        subject = np.zeros((size, size), np.float32)
        subject[y0:y0 + ph, x0:x0 + pw] = mask
    if flip:
        canvas, area = canvas[:, ::-1], area[:, ::-1]
        subject = None if subject is None else subject[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).float() / 127.5 - 1
    return TrainingView(pixels=pixels, image_area=_latent(np.ascontiguousarray(area)),
                        subject=None if subject is None else _latent(np.ascontiguousarray(subject)))


# ----------------------------------------------------------------------------------- captions


def make_caption(caption: str, concept_words: str, rng: random.Random, *, placeholder: str = PLACEHOLDER,
                 templates: Sequence[str] = ("{}",), shuffle: bool = True, keep_parts: int = 1) -> str:
    """A step's caption: comma parts after the first `keep_parts` shuffled (tag order is noise the
    model should not learn), put into a random template, the placeholder replaced by the concept
    words. Draws: the shuffle (when on), then the template."""
    if not templates:
        raise ValueError("templates must not be empty")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"caption template {t!r} has no {{}} for the caption")
    if placeholder not in caption:
        raise ValueError(f"caption {caption!r} has no {placeholder}, so the concept would not be in it")
    parts = [p.strip() for p in caption.split(",")]
    parts = [p for p in parts if p]
    head, tail = parts[:keep_parts], parts[keep_parts:]
    if shuffle:
        rng.shuffle(tail)
    template = rng.choice(list(templates))
    return template.replace("{}", ", ".join(head + tail), 1).replace(placeholder, concept_words)
