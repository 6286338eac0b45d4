"""lib_mos.training.data: reading a training folder (both layouts, every error naming its file),
the authors' crop/paste augmentation keeping masks aligned with pixels, and caption making."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib_mos.training import data as td
from lib_mos.training.data import (
    IMAGE_SUFFIXES,
    PLACEHOLDER,
    TEMPLATES,
    TrainingDataError,
    TrainingImage,
    augment_view,
    make_caption,
    read_training_folder,
)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def picture(size: tuple[int, int], color=RED, *, left: int = 0, left_color=GREEN, top: int = 0,
            top_color=BLUE, mode: str = "RGB") -> Image.Image:
    """A solid picture, optionally with its `left` columns and `top` rows in other colours."""
    img = Image.new("RGB", size, color)
    if left:
        img.paste(left_color, (0, 0, left, size[1]))
    if top:
        img.paste(top_color, (0, 0, size[0], top))
    return img.convert(mode)


def mask_of(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """Black mask, white inside `box` (left, top, right, bottom)."""
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


def write(path: Path, content: Image.Image | str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Image.Image):
        content.save(path)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def error_of(folder: Path, **kwargs) -> str:
    with pytest.raises(TrainingDataError) as info:
        read_training_folder(folder, **kwargs)
    return str(info.value)


def item_of(size=(64, 64), mask: Image.Image | None = None, **kwargs) -> TrainingImage:
    return TrainingImage(path=Path("x.png"), image=picture(size, **kwargs), caption=PLACEHOLDER, mask=mask)


# ------------------------------------------------------------------------------------- reading


def test_module_does_not_import_the_host():
    tree = ast.parse(Path(td.__file__).read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "modules" not in names
    assert names <= {"__future__", "random", "re", "collections", "dataclasses", "pathlib", "numpy", "torch", "PIL"}


def test_flat_layout_pairs_captions_and_the_right_masks(tmp_path):
    write(tmp_path / "c.webp", picture((64, 64)))
    write(tmp_path / "c_mask.png", mask_of((64, 64), (0, 0, 10, 10)))
    write(tmp_path / "c.txt", "a Dog on the grass, sunny\n")
    write(tmp_path / "a.png", picture((70, 64)))  # a png picture with no mask: a.png is not a mask
    write(tmp_path / "b.JPG", picture((64, 80), BLUE))
    write(tmp_path / "b.png", mask_of((64, 80), (5, 5, 30, 30)))  # mask of a non-png picture
    write(tmp_path / "b.txt", f"\ufeff  a photo of {PLACEHOLDER}, smiling \n")
    write(tmp_path / ".hidden.png", b"not an image")
    write(tmp_path / ".x.txt", "stray")
    write(tmp_path / "meta.json", "{}")
    write(tmp_path / "sub" / "z.png", b"ignored")

    items = read_training_folder(tmp_path, class_word="dog")
    assert [i.path.name for i in items] == ["a.png", "b.JPG", "c.webp"]
    assert all(i.path.is_absolute() and i.path.parent == tmp_path for i in items)
    a, b, c = items
    assert (a.caption, a.mask) == (PLACEHOLDER, None)
    assert b.caption == f"a photo of {PLACEHOLDER}, smiling"
    assert c.caption == f"a {PLACEHOLDER} on the grass, sunny"
    assert all(i.image.mode == "RGB" for i in items)
    assert b.image.size == (64, 80) and np.abs(np.subtract(b.image.getpixel((10, 50)), BLUE)).max() < 8  # JPEG
    assert b.mask.mode == "L" and b.mask.getbbox() == (5, 5, 30, 30)
    assert c.mask.mode == "L" and c.mask.getbbox() == (0, 0, 10, 10)


@pytest.mark.parametrize(("text", "class_word", "expected"), [
    ("a photo of a dog", "dog", "a photo of a <TOK>"),
    ("a DOG, dog toy, dogs", "dog", "a <TOK>, dog toy, dogs"),  # first occurrence only
    ("hotdog next to a dog", "dog", "hotdog next to a <TOK>"),  # whole words only
    ("dog-friendly dog", "dog", "<TOK>-friendly dog"),
    ("a brown Teddy  Bear", "teddy bear", "a brown <TOK>"),
    ("a dog, <TOK> on a mat", "dog", "a dog, <TOK> on a mat"),  # placeholder present: kept as is
    ("<TOK> on a mat", None, "<TOK> on a mat"),
    ("a $dog$ (1)", "$dog$", "a <TOK> (1)"),  # the class word is literal text
])
def test_caption_rules(tmp_path, text, class_word, expected):
    write(tmp_path / "p.png", picture((64, 64)))
    write(tmp_path / "p.txt", text)
    (item,) = read_training_folder(tmp_path, class_word=class_word)
    assert item.caption == expected


def test_custom_placeholder(tmp_path):
    write(tmp_path / "p.png", picture((64, 64)))
    write(tmp_path / "p.txt", "[V] dog and a dog")
    assert read_training_folder(tmp_path, placeholder="[V]", class_word="dog")[0].caption == "[V] dog and a dog"
    write(tmp_path / "p.txt", "a cat")
    assert read_training_folder(tmp_path, placeholder="[V]", class_word="cat")[0].caption == "a [V]"


@pytest.mark.parametrize(("text", "class_word", "says"), [
    ("a photo of a cat", None, "caption has no place for the concept: put <TOK>"),
    ("a photo of a cat", "dog", "caption has no place for the concept: put <TOK> or the class word 'dog'"),
    ("a hotdog", "dog", "caption has no place"),
    ("  \n ", "dog", "caption is empty"),
])
def test_caption_errors_name_the_caption_file(tmp_path, text, class_word, says):
    write(tmp_path / "p.png", picture((64, 64)))
    write(tmp_path / "p.txt", text)
    message = error_of(tmp_path, class_word=class_word)
    assert message.startswith(f"{tmp_path / 'p.txt'}: ") and says in message


def test_caption_not_utf8(tmp_path):
    write(tmp_path / "p.png", picture((64, 64)))
    write(tmp_path / "p.txt", "caf\xe9 <TOK>".encode("latin-1"))
    message = error_of(tmp_path)
    assert str(tmp_path / "p.txt") in message and "UTF-8" in message


def test_exif_orientation_is_applied_to_images(tmp_path):
    stored = picture((80, 64), BLUE, left=40, left_color=RED)  # stored landscape, left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the red half ends up on top
    stored.save(tmp_path / "p.jpg", exif=exif, quality=95)
    (item,) = read_training_folder(tmp_path)
    assert item.image.size == (64, 80)
    top, bottom = np.asarray(item.image)[10, 32], np.asarray(item.image)[70, 32]
    assert top[0] > 180 and top[2] < 60 and bottom[2] > 180 and bottom[0] < 60

    write(tmp_path / "p.png", mask_of((64, 80), (0, 0, 64, 40)))  # the mask of what a viewer shows
    assert read_training_folder(tmp_path)[0].mask.size == (64, 80)
    write(tmp_path / "p.png", mask_of((80, 64), (0, 0, 40, 64)))  # the stored (unrotated) size
    message = error_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'p.png'}: ") and "80x64" in message and "64x80" in message


def test_transparency_is_composited_on_black_and_masks_become_greyscale(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 32, 64))
    write(tmp_path / "p.png", rgba)
    write(tmp_path / "p_mask.png", mask_of((64, 64), (0, 0, 32, 64)).convert("RGB"))
    (item,) = read_training_folder(tmp_path)
    assert item.image.mode == "RGB" and item.image.getpixel((5, 5)) == (10, 200, 10)
    assert item.image.getpixel((50, 5)) == (0, 0, 0)
    assert item.mask.mode == "L" and item.mask.getpixel((5, 5)) == 255 and item.mask.getpixel((50, 5)) == 0


def test_authors_layout(tmp_path):
    write(tmp_path / "image" / "b.png", picture((64, 96)))
    write(tmp_path / "image" / "a.jpg", picture((96, 64)))
    write(tmp_path / "mask" / "a.png", mask_of((96, 64), (1, 2, 3, 4)))
    write(tmp_path / "mask" / "b_mask.png", mask_of((64, 96), (5, 6, 7, 8)))
    write(tmp_path / "caption" / "b.txt", "a man, <TOK> smiling")
    write(tmp_path / "caption" / "a.txt", "a Man walking")
    write(tmp_path / "notes.md", "not read")
    a, b = read_training_folder(tmp_path, class_word="man")
    assert (a.path, b.path) == (tmp_path / "image" / "a.jpg", tmp_path / "image" / "b.png")
    assert a.caption == "a <TOK> walking" and b.caption == "a man, <TOK> smiling"
    assert a.mask.getbbox() == (1, 2, 3, 4) and b.mask.getbbox() == (5, 6, 7, 8)


@pytest.mark.parametrize(("extra", "bad", "says"), [
    ("caption/z.txt", "caption/z.txt", "caption has no image"),
    ("mask/z.png", "mask/z.png", "mask has no image"),
    ("mask/z_mask.png", "mask/z_mask.png", "mask has no image"),
    ("mask/a.jpg", "mask/a.jpg", "masks must be PNG"),
    ("stray.png", "stray.png", "move it into image/"),
])
def test_authors_layout_errors(tmp_path, extra, bad, says):
    write(tmp_path / "image" / "a.jpg", picture((64, 64)))
    target = tmp_path / extra
    write(target, "<TOK>" if target.suffix == ".txt" else mask_of((64, 64), (0, 0, 8, 8)))
    message = error_of(tmp_path)
    assert message.startswith(f"{tmp_path / bad}: ") and says in message


def test_authors_layout_without_images(tmp_path):
    (tmp_path / "image").mkdir()
    write(tmp_path / "caption" / "a.txt", "<TOK>")
    message = error_of(tmp_path)
    assert message.startswith(f"{tmp_path / 'image'}: ") and "no training images" in message


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    assert error_of(missing).startswith(f"{missing}: ") and "does not exist" in error_of(missing)
    file = write(tmp_path / "file.png", picture((64, 64)))
    assert error_of(file).startswith(f"{file}: ") and "not a folder" in error_of(file)
    empty = tmp_path / "empty"
    write(empty / "meta.json", "{}")
    write(empty / ".hidden.png", picture((64, 64)))
    message = error_of(empty)
    assert message.startswith(f"{empty}: ") and "no training images" in message
    assert all(s in message for s in IMAGE_SUFFIXES)


def test_relative_folder_is_named_in_full(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "imgs" / "a.png", b"garbage")
    assert error_of(Path("imgs")).startswith(f"{tmp_path / 'imgs' / 'a.png'}: ")


@pytest.mark.parametrize(("files", "bad", "says"), [
    ({"a.png": b"\x89PNG broken"}, "a.png", "cannot read this image"),
    ({"a.png": ((63, 100),)}, "a.png", "63x100"),
    ({"a.jpg": ((64, 64),), "a.webp": ((64, 64),)}, "a.webp", "same name stem (a.jpg)"),
    ({"a.png": ((64, 64),), "b.txt": "<TOK>"}, "b.txt", "caption has no image"),
    ({"a.png": ((64, 64),), "b_mask.png": "mask"}, "b_mask.png", "mask has no image"),
    ({"a.jpg": ((64, 64),), "a_mask.png": "mask", "a.png": "mask"}, "a_mask.png", "two masks"),
    ({"a.png": ((64, 64),), "a_mask.png": Image.new("L", (64, 64), 100)}, "a_mask.png", "marks no subject"),
    ({"a.png": ((64, 64),), "a_mask.png": Image.new("L", (64, 65), 255)}, "a_mask.png", "64x65"),
])
def test_file_errors_name_the_file(tmp_path, files, bad, says):
    for name, content in files.items():
        if content == "mask":
            content = mask_of((64, 64), (0, 0, 8, 8))
        elif isinstance(content, tuple):
            content = picture(*content)
        write(tmp_path / name, content)
    message = error_of(tmp_path)
    assert message.startswith(f"{tmp_path / bad}: ") and says in message


def test_unreadable_image_chains_the_cause(tmp_path):
    write(tmp_path / "a.jpg", b"\xff\xd8 not really")
    with pytest.raises(TrainingDataError) as info:
        read_training_folder(tmp_path)
    assert info.value.__cause__ is not None and str(tmp_path / "a.jpg") in str(info.value)


def test_min_side_is_the_shorter_side(tmp_path):
    write(tmp_path / "a.png", picture((100, 40)))
    assert "100x40" in error_of(tmp_path, min_side=64)
    assert read_training_folder(tmp_path, min_side=40)[0].image.size == (100, 40)


def test_the_first_problem_in_file_order_is_reported(tmp_path):
    write(tmp_path / "b.png", b"broken")
    write(tmp_path / "c.txt", "orphan <TOK>")
    assert error_of(tmp_path).startswith(f"{tmp_path / 'b.png'}: ")
    write(tmp_path / "a.txt", "orphan <TOK>")
    assert error_of(tmp_path).startswith(f"{tmp_path / 'a.txt'}: ")


# ---------------------------------------------------------------------------------- augmenting


def nonblack_area(pixels: torch.Tensor) -> torch.Tensor:
    """[1, S/8, S/8] covered fraction of the non-black pixels of a view."""
    return F.avg_pool2d((pixels > -0.99).any(0).float()[None], 8)


def test_view_shapes_ranges_and_determinism():
    item = item_of((96, 64), left=20, mask=mask_of((96, 64), (10, 10, 40, 40)))
    view = augment_view(item, 64, random.Random(3), crop_p=0.5, flip_p=0.5)
    assert view.pixels.shape == (3, 64, 64) and view.pixels.dtype == torch.float32
    assert view.image_area.shape == view.subject.shape == (1, 8, 8)
    assert view.image_area.dtype == view.subject.dtype == torch.float32
    assert view.pixels.min() >= -1 and view.pixels.max() <= 1
    assert augment_view(item, 64, random.Random(3), crop_p=0).pixels.min() == -1  # black canvas, letterboxed
    for t in (view.image_area, view.subject):
        assert t.min() >= 0 and t.max() <= 1
    again = augment_view(item, 64, random.Random(3), crop_p=0.5, flip_p=0.5)
    assert torch.equal(view.pixels, again.pixels) and torch.equal(view.subject, again.subject)
    others = {augment_view(item, 64, random.Random(s), crop_p=0.5, flip_p=0.5).pixels.numpy().tobytes()
              for s in range(8)}
    assert len(others) > 4
    assert augment_view(item_of((64, 64)), 64, random.Random(0)).subject is None


@pytest.mark.parametrize("resolution", [60, 0, -8, 64.0])
def test_resolution_must_be_a_multiple_of_8(resolution):
    with pytest.raises(ValueError, match="multiple of 8"):
        augment_view(item_of(), resolution, random.Random(0))


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (64, 128), (50, 160), (160, 50)])
def test_image_area_is_where_the_picture_is(size):
    item = item_of(size, color=(200, 120, 40))
    for seed in range(6):
        view = augment_view(item, 64, random.Random(seed), crop_p=0.5, flip_p=0.5)
        assert torch.allclose(view.image_area, nonblack_area(view.pixels), atol=1e-6)
        assert view.image_area.max() == 1


def test_no_crop_keeps_the_whole_picture_letterboxed():
    item = item_of((128, 64), left=32, left_color=GREEN)  # a quarter green on the left
    for seed in range(4):
        view = augment_view(item, 64, random.Random(seed), crop_p=0.0)
        assert view.image_area.sum().item() == pytest.approx(64 * 32 / 64)  # 64x32 pasted
        inside = view.pixels[:, (view.pixels > -0.99).any(0)]
        green = ((inside[1] > 0.5) & (inside[0] < -0.5)).float().mean().item()
        assert green == pytest.approx(0.25, abs=0.04)


def test_paste_position_is_random_on_both_axes():
    for size, axis in (((128, 64), 1), ((64, 128), 0)):  # landscape: rows free; portrait: columns free
        offsets = set()
        for seed in range(16):
            covered = (augment_view(item_of(size), 64, random.Random(seed), crop_p=0.0).pixels > -0.99).any(0)
            offsets.add(int(covered.any(axis).float().argmax()))
        assert len(offsets) > 6 and min(offsets) >= 0 and max(offsets) <= 32


def test_crop_of_a_landscape_fills_the_canvas():
    view = augment_view(item_of((128, 64)), 64, random.Random(0), crop_p=1.0)
    assert bool((view.image_area == 1).all())


def test_crop_of_a_portrait_keeps_its_top():
    item = item_of((64, 256), color=BLUE, top=64, top_color=RED)  # the top square is red
    heights = set()
    for seed in range(12):
        view = augment_view(item, 64, random.Random(seed), crop_p=1.0)
        columns = (view.pixels > -0.99).any(0).any(0)
        top_row = view.pixels[:, 0, columns]
        assert bool((top_row[0] > 0.5).all()) and bool((top_row[2] < -0.5).all())  # always red at the top
        heights.add(int(columns.sum()))  # pasted width: 64 * 64 / crop height
    assert len(heights) > 3 and max(heights) > 32  # crop heights vary, shorter than the whole picture


def test_subject_mask_stays_on_the_subject_through_crop_paste_and_flip():
    # left third red and masked, rest green: a mirrored or shifted mask lands on green
    item = item_of((96, 64), color=GREEN, left=32, left_color=RED, mask=mask_of((96, 64), (0, 0, 32, 64)))
    portrait = item_of((64, 112), color=GREEN, top=40, top_color=RED, mask=mask_of((64, 112), (0, 0, 64, 40)))
    checked = 0
    for it in (item, portrait):
        for seed in range(16):
            view = augment_view(it, 64, random.Random(seed), crop_p=0.5, flip_p=0.5)
            assert bool((view.subject <= view.image_area + 1e-6).all())
            blocks = F.avg_pool2d(view.pixels[None], 8)[0]  # [3, 8, 8] mean colour per latent cell
            red = (blocks[0] > 0.5) & (blocks[1] < -0.5)
            green = (blocks[1] > 0.5) & (blocks[0] < -0.5)
            full, empty = view.subject[0] == 1, (view.subject[0] == 0) & (view.image_area[0] == 1)
            assert bool(red[full].all()) and bool(green[empty].all())
            checked += int(full.sum()) + int(empty.sum())
            fractional = (view.subject[0] > 0) & (view.subject[0] < 1)
            assert bool((~green[fractional]).all())
    assert checked > 500


def test_flip_mirrors_pixels_and_masks_together():
    item = item_of((96, 64), color=GREEN, left=32, left_color=RED, mask=mask_of((96, 64), (0, 0, 32, 64)))
    for seed in range(4):
        plain = augment_view(item, 64, random.Random(seed), crop_p=0.5, flip_p=0.0)
        flipped = augment_view(item, 64, random.Random(seed), crop_p=0.5, flip_p=1.0)
        assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
        assert torch.equal(flipped.image_area, plain.image_area.flip(-1))
        assert torch.equal(flipped.subject, plain.subject.flip(-1))
        assert not torch.equal(flipped.subject, plain.subject)


def test_mask_is_binarised_at_half_before_area_averaging():
    grey = Image.new("L", (64, 64), 127)
    grey.paste(128, (0, 0, 32, 64))  # only the left half is at least half white
    view = augment_view(item_of((64, 64), mask=grey), 64, random.Random(0), crop_p=0.0)
    assert torch.equal(view.subject[0], torch.tensor([[1.0] * 4 + [0.0] * 4] * 8))


# ------------------------------------------------------------------------------------ captions


def test_templates():
    assert set(TEMPLATES) == {"human", "object", "style", "none"}
    assert TEMPLATES["none"] == ["{}"]
    for key in ("human", "object", "style"):
        assert 10 <= len(TEMPLATES[key]) <= 20 and len(set(TEMPLATES[key])) == len(TEMPLATES[key])
        assert all(t.count("{}") == 1 and t.count("{") == 1 for t in TEMPLATES[key])
    assert all("in the style of {}" in t for t in TEMPLATES["style"])


def test_make_caption_keeps_the_first_part_and_shuffles_the_rest():
    caption = f"{PLACEHOLDER} man, red hat,blue coat , on a bench, at night, smiling"
    rest = ["red hat", "blue coat", "on a bench", "at night", "smiling"]
    words = "<alice1> <alice2>"
    orders = set()
    for seed in range(10):
        out = make_caption(caption, words, random.Random(seed))
        parts = out.split(", ")
        assert parts[0] == "<alice1> <alice2> man" and sorted(parts[1:]) == sorted(rest)
        assert out == make_caption(caption, words, random.Random(seed))
        orders.add(out)
    assert len(orders) > 5
    assert make_caption(caption, words, random.Random(0), shuffle=False) == ", ".join(["<alice1> <alice2> man", *rest])
    kept = make_caption(caption, words, random.Random(1), keep_parts=3).split(", ")
    assert kept[:3] == ["<alice1> <alice2> man", "red hat", "blue coat"]
    assert sorted(kept[3:]) == sorted(rest[2:])


def test_make_caption_draws_as_documented():
    caption, templates = f"{PLACEHOLDER}, a, b, c", ["a photo of {}", "art of {}", "{} outdoors"]
    for seed in range(6):
        rng = random.Random(seed)
        tail = ["a", "b", "c"]
        rng.shuffle(tail)
        expected = rng.choice(templates).replace("{}", ", ".join(["X", *tail]))
        assert make_caption(caption, "X", random.Random(seed), templates=templates) == expected


def test_make_caption_picks_templates_and_replaces_every_placeholder():
    templates = ["a photo of {}", "{} in the style of {{x}}", "art of {}"]
    seen = set()
    for seed in range(20):
        out = make_caption(f"{PLACEHOLDER}, {PLACEHOLDER} again", "<s1> <s2>", random.Random(seed),
                           templates=templates, shuffle=False)
        assert PLACEHOLDER not in out and out.count("<s1> <s2>") == 2
        seen.add(out)
    assert seen == {"a photo of <s1> <s2>, <s1> <s2> again", "<s1> <s2>, <s1> <s2> again in the style of {{x}}",
                    "art of <s1> <s2>, <s1> <s2> again"}
    assert make_caption("[V] {weird}", "tok", random.Random(0), placeholder="[V]",
                        templates=TEMPLATES["none"]) == "tok {weird}"


def test_make_caption_refuses_what_would_lose_the_concept():
    with pytest.raises(ValueError, match="no <TOK>"):
        make_caption("a photo", "x", random.Random(0))
    with pytest.raises(ValueError, match="no \\{\\}"):
        make_caption(PLACEHOLDER, "x", random.Random(0), templates=["a photo"])
    with pytest.raises(ValueError, match="empty"):
        make_caption(PLACEHOLDER, "x", random.Random(0), templates=[])
