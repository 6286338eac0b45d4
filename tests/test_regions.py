"""Region specs: the one JSON form, the authors' textual form, strict validation, and masks at the
resolutions the UNet's attn2 layers really see."""

from __future__ import annotations

import base64
import io
import math

import pytest
import torch
from PIL import Image, ImageDraw

from lib_mos.models import sd1
from lib_mos.models.family import SD1, SDXL, attn2_modules
from lib_mos.models.sampling import any_multiple_of_8
from lib_mos.regional import regions
from lib_mos.regional.regions import MAX_REGIONS, PASS_UNET_WEIGHT, Region, RegionError, RegionSpec


def png_b64(width: int, height: int, rects: list[tuple[tuple[int, int, int, int], str]], mode: str = "RGB",
            data_url: bool = False) -> str:
    """A painted mask: rects are ((left, top, right, bottom) exclusive, colour) on black."""
    image = Image.new(mode, (width, height), (0, 0, 0, 0) if mode == "RGBA" else (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for (left, top, right, bottom), color in rects:
        draw.rectangle((left, top, right - 1, bottom - 1), fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


# ------------------------------------------------------------------------------------------- JSON


def test_json_round_trip():
    mask = png_b64(64, 48, [((0, 0, 32, 48), "#ff0000")], data_url=True)
    spec = RegionSpec(
        regions=(
            Region("a <cat1> <cat2>, sitting", negative="blurry, ugly", box=(0, 0, 512, 256)),
            Region("a ünïcode dog", box=(0.125, 0.5, 0.875, 1.0), units="fraction"),
            Region("a tree", color="#FF0000"),
        ),
        mask_image=mask,
        feather=2.5,
    )
    text = spec.to_json()
    assert RegionSpec.from_json(text) == spec
    assert RegionSpec.from_json(spec.to_dict()) == spec
    assert spec.regions[2].color == "#ff0000"  # normalised
    assert '"units"' in text and '"px"' not in text  # defaults are left out
    assert RegionSpec.from_json('{"regions": []}') == RegionSpec()
    plain = RegionSpec([Region("x", box=[1, 2, 3, 4])])
    assert plain.to_json() == '{"regions":[{"prompt":"x","box":[1,2,3,4]}]}'
    passes = RegionSpec(plain.regions, passes=True)
    assert passes.pass_unet_weight == PASS_UNET_WEIGHT and '"pass_unet_weight"' not in passes.to_json()
    full = RegionSpec.from_json('{"regions":[{"prompt":"x","box":[1,2,3,4]}],"passes":true,"pass_unet_weight":1}')
    assert full.pass_unet_weight == 1 and RegionSpec.from_json(full.to_json()) == full
    assert full.to_json().endswith('"passes":true,"pass_unet_weight":1}')
    for bad in ('"0.5"', "1.5", "-0.1", "true", "null"):
        with pytest.raises(RegionError, match="field 'pass_unet_weight' must be a number in \\[0, 1\\]"):
            RegionSpec.from_json(f'{{"regions":[],"pass_unet_weight":{bad}}}')


def test_authors_textual_form():
    text = (
        "[a <hina1> <hina2>, standing near a forest]-*-[longbody, lowres]-*-[12, 36, 1024, 600]|"
        "[a <tezuka1> <tezuka2>, [red|blue] hat]-*-[]-*-[18, 696, 1024, 1180]|"
        "[a sky]-*-[dark]-*-[]|"
    )
    spec = RegionSpec.from_json(text)
    assert spec == regions.parse_authors_spec(text)
    a, b, c = spec.regions
    assert (a.prompt, a.negative, a.box, a.units) == ("a <hina1> <hina2>, standing near a forest",
                                                     "longbody, lowres", (12, 36, 1024, 600), "px")
    assert b.prompt == "a <tezuka1> <tezuka2>, [red|blue] hat" and b.negative == ""  # '|' inside [] kept
    assert (c.box, c.units) == ((0, 0, 1, 1), "fraction")  # [] = the whole image
    assert RegionSpec.from_json(spec.to_json()) == spec
    for bad, field in [
        ("[a]-*-[b]", "region 0: expected"),
        ("[a]-*-[b]-*-[1, 2, 3]|[c]-*-[]-*-[]", "region 0: field 'box'"),
        ("[a]-*-[]-*-[]|[b]-*-[]-*-__import__('os')", "region 1: field 'box'"),  # never eval'd
        ("a-*-[]-*-[]", "region 0: field 'prompt'"),
        ("[a]-*-[]-*-[0, 0, 10, NaN]", "region 0: field 'box'"),
    ]:
        with pytest.raises(RegionError, match=field.replace("(", r"\(").replace("[", r"\[")):
            RegionSpec.from_json(bad)
    with pytest.raises(RegionError, match="at most 16"):
        RegionSpec.from_json("|".join(["[a]-*-[]-*-[]"] * (MAX_REGIONS + 1)))


def region_json(**fields) -> str:
    import json

    base = {"prompt": "a cat", "box": [0, 0, 64, 64]}
    base.update(fields)
    return json.dumps({"regions": [{"prompt": "ok", "box": [0, 0, 8, 8]}, {k: v for k, v in base.items() if v != "DROP"}]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (region_json(colour="#ff0000"), "region 1: unknown field 'colour'"),
        (region_json(box=[10, 0, 10, 64]), "region 1: field 'box'.*top must be less than bottom"),
        (region_json(box=[0, 30, 64, 20]), "region 1: field 'box'.*left must be less than right"),
        (region_json(box=[0, 0, 64]), "region 1: field 'box' must be 4 numbers"),
        (region_json(box=[0, 0, 64, True]), "region 1: field 'box' must be 4 numbers"),
        (region_json(box=[-8, 0, 64, 64]), "region 1: field 'box'.*outside the image"),
        (region_json(box=[0, 0, 0.5, 1.5], units="fraction"), "region 1: field 'box'.*outside the image"),
        (region_json(units="inch"), "region 1: field 'units'"),
        (region_json(prompt=3), "region 1: field 'prompt' must be a string"),
        (region_json(prompt="  "), "region 1: field 'prompt' is empty"),
        (region_json(prompt="DROP"), "region 1: field 'prompt' is missing"),
        (region_json(negative=None), "region 1: field 'negative' must be a string"),
        (region_json(box="DROP"), "region 1: field 'box': a region needs exactly one"),
        (region_json(color="#ff0000"), "region 1: field 'box': a region needs exactly one"),
        (region_json(box="DROP", color="red"), "region 1: field 'color' must be '#rrggbb'"),
        (region_json(box="DROP", color="#ff00"), "region 1: field 'color' must be '#rrggbb'"),
        (region_json(box="DROP", color="#000000"), "region 1: field 'color': black"),
        (region_json(box="DROP", color="#00ff00"), "region 1: field 'color' needs a painted 'mask_image'"),
        ('{"regions": [{"prompt": "a", "box": [0, 0, 8, NaN]}]}', "NaN"),
        ('{"regions": [{"prompt": "a", "box": [0, 0, 8, 1e999]}]}', "region 0: field 'box' has a non-finite"),
        ('{"regions": [{"prompt": "a", "prompt": "b", "box": [0, 0, 8, 8]}]}', "field 'prompt' appears twice"),
        ('{"regions": [], "extra": 1}', "unknown field 'extra'"),
        ('{"regions": {}}', "field 'regions' must be a list"),
        ('{"regions": [], "feather": -1}', "field 'feather'"),
        ('{"regions": [], "feather": "2"}', "field 'feather'"),
        ('{"regions": [], "feather": 100}', "field 'feather'"),
        ('{"regions": [], "mask_image": "not base64!"}', "field 'mask_image' is not valid base64"),
        ('{"regions": [], "mask_image": "aGVsbG8="}', "field 'mask_image' is not a PNG"),
        ('{"regions": [], "mask_image": "data:image/jpeg;base64,aGVsbG8="}', "field 'mask_image' must be a PNG"),
        ('{"regions": [1]}', "region 0: must be an object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_validation_names_region_and_field(text, message):
    with pytest.raises(RegionError, match=message):
        RegionSpec.from_json(text)


def test_more_regions_than_supported_and_spec_level_rules():
    many = [Region(f"r{i}", box=(0, 0, 8, 8)) for i in range(MAX_REGIONS + 1)]
    with pytest.raises(RegionError, match=f"17 regions, at most {MAX_REGIONS}"):
        RegionSpec(many)
    RegionSpec(many[:MAX_REGIONS])
    mask = png_b64(16, 16, [((0, 0, 8, 8), "#ff0000")])
    with pytest.raises(RegionError, match="no region names one of its colours"):
        RegionSpec([Region("a", box=(0, 0, 8, 8))], mask_image=mask)
    with pytest.raises(RegionError, match="region 1: field 'color' #ff0000 is already used by region 0"):
        RegionSpec([Region("a", color="#ff0000"), Region("b", color="#FF0000")], mask_image=mask)
    with pytest.raises(RegionError, match=r"^field 'box'.*top must be less than bottom"):
        Region("a", box=(4, 0, 2, 8))  # direct construction validates too (no index to name)


# --------------------------------------------------------------------------------------- geometry


def test_masks_are_checked_against_the_image():
    spec = RegionSpec([Region("a", box=(0, 0, 64, 64)), Region("b", box=(0, 0, 72, 64))])
    with pytest.raises(RegionError, match=r"region 1: field 'box' \[0.0, 0.0, 72.0, 64.0\] lies outside the 64x64"):
        regions.region_masks(spec, 64, 64)
    thin = RegionSpec([Region("a", box=(0, 0, 64, 64)), Region("b", box=(10, 0, 15, 64))])
    with pytest.raises(RegionError, match=r"region 1: field 'box'.*covers no cell of the 8x8 latent"):
        regions.region_masks(thin, 64, 64)
    with pytest.raises(RegionError, match="width must be a positive multiple of 8"):
        regions.region_masks(spec, 60, 64)
    with pytest.raises(RegionError, match="height must be a positive multiple of 8"):
        regions.attention_sizes(64, 0)
    painted = RegionSpec([Region("a", color="#ff0000"), Region("b", color="#00ff00")],
                         mask_image=png_b64(64, 64, [((0, 0, 32, 64), "#ff0000"), ((32, 0, 36, 64), "#00ff00")]))
    stretched = regions.region_masks(RegionSpec(painted.regions[:1], mask_image=painted.mask_image), 128, 64)
    assert stretched.shape == (1, 8, 16) and stretched[0, :, :8].all() and not stretched[0, :, 8:].any()
    with pytest.raises(RegionError, match="region 1: field 'color' #00ff00 covers no cell"):
        regions.region_masks(painted, 64, 64)  # a 4 px stroke: no latent cell centre falls on it


@pytest.fixture(scope="module")
def unet():
    return sd1.build_tiny_sd1(seed=0).unet


SIZES = [(96, 64), (120, 72), (136, 200), (200, 136), (168, 104)]  # (width, height)


@torch.no_grad()
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_attention_sizes_match_the_unet(unet, width, height):
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
             for _, m in attn2_modules(unet)]
    try:
        with any_multiple_of_8():
            unet(torch.randn(1, 4, height // 8, width // 8), torch.tensor([500.0]), context=torch.randn(1, 77, 32))
    finally:
        for hook in hooks:
            hook.remove()
    sizes = regions.attention_sizes(width, height)
    assert [h * w for h, w in sizes] == seen
    assert sizes[0] == (height // 8, width // 8)
    assert sizes[6] == (math.ceil(height / 64), math.ceil(width / 64))  # middle block: 3 ceil halvings


def authors_box(box, width, height, h, w) -> torch.Tensor:
    """The rule written out in plain floats: rows ceil(t*h/H):floor(b*h/H), cols ceil(l*w/W):floor(r*w/W)."""
    top, left, bottom, right = box
    m = torch.zeros(h, w)
    rows = slice(math.ceil(top * h / height), math.floor(bottom * h / height))
    m[rows, math.ceil(left * w / width):math.floor(right * w / width)] = 1
    return m.reshape(-1)


@pytest.mark.parametrize("family", [SD1, SDXL], ids=["sd1", "sdxl"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_boxes_follow_the_ceil_floor_rule_at_every_layer(width, height, family):
    gen = torch.Generator().manual_seed(width * 1000 + height)
    boxes = []
    while len(boxes) < 5:
        t, b = sorted(torch.randint(0, height + 1, (2,), generator=gen).tolist())
        left, r = sorted(torch.randint(0, width + 1, (2,), generator=gen).tolist())
        if b - t >= 16 and r - left >= 16:
            boxes.append((t, left, b, r))
    boxes.append((0, 0, height, width))
    spec = RegionSpec([Region(f"r{i}", box=box) for i, box in enumerate(boxes)])
    fractions = RegionSpec([Region(f"r{i}", box=(t / height, le / width, b / height, r / width), units="fraction")
                            for i, (t, le, b, r) in enumerate(boxes)])
    ours = regions.layer_masks(spec, width, height, family=family)
    sizes = regions.attention_sizes(width, height, family)
    assert len(ours) == family.layers
    for (h, w), masks in zip(sizes, ours):
        assert masks.shape == (len(boxes), h * w)
        for i, box in enumerate(boxes):
            assert torch.equal(masks[i], authors_box(box, width, height, h, w)), (i, h, w)
    for a, b in zip(ours, regions.layer_masks(fractions, width, height, family=family)):
        assert torch.equal(a, b)
    assert ours[0] is ours[1] and ours[0] is ours[-1]  # equal sizes share one tensor
    levels = regions.level_masks(spec, width, height, family=family)
    assert torch.equal(regions.region_masks(spec, width, height).flatten(1), levels[(height // 8, width // 8)])


def test_box_boundaries_are_exact_decimals():
    """0.1 of 80 px is exactly 8 px: the boundary row is in, whatever binary floats would say."""
    spec = RegionSpec([Region("a", box=(0.1, 0.3, 0.7, 0.9), units="fraction")])
    m = regions.region_masks(spec, 80, 80)[0]  # latent 10x10
    assert m.nonzero()[:, 0].unique().tolist() == list(range(1, 7))
    assert m.nonzero()[:, 1].unique().tolist() == list(range(3, 9))


def test_masks_for_layers_is_an_area_mean_on_the_ceil_grid():
    gen = torch.Generator().manual_seed(0)
    latent = torch.rand(2, 9, 15, generator=gen)
    sizes = regions.attention_sizes(120, 72)  # (9, 15), (5, 8), (3, 4), (2, 2)
    pooled = regions.masks_for_layers(latent, sizes)
    for (h, w), got in zip(sizes, pooled):
        fy, fx = 9 // h + (9 % h > 0), 15 // w + (15 % w > 0)
        fy, fx = 2 ** math.ceil(math.log2(fy)), 2 ** math.ceil(math.log2(fx))
        want = torch.stack([
            torch.stack([latent[:, i * fy:(i + 1) * fy, j * fx:(j + 1) * fx].mean((1, 2)) for j in range(w)], -1)
            for i in range(h)
        ], -2).reshape(2, -1)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="halved"):
        regions.masks_for_layers(latent, [(4, 8)])


def test_painted_mask_gives_one_region_per_colour():
    # 64 x 48 image = 8 x 6 latent; red: left half, green: a 16 x 16 block; an anti-aliased grey
    # edge and a transparent-but-coloured corner belong to no region.
    mask = png_b64(64, 48, [((0, 0, 32, 48), "#ff0000"), ((40, 16, 56, 32), "#00ff00"),
                            ((32, 0, 34, 48), "#7f7f7f")], mode="RGBA")
    spec = RegionSpec([Region("red thing", color="#ff0000"), Region("green thing", color="#00ff00")], mask_image=mask)
    masks = regions.region_masks(spec, 64, 48)
    red, green = torch.zeros(6, 8), torch.zeros(6, 8)
    red[:, :4] = 1
    green[2:4, 5:7] = 1
    assert torch.equal(masks[0], red) and torch.equal(masks[1], green)
    assert regions.mask_colors(mask) == ["#ff0000", "#00ff00", "#7f7f7f"]
    layers = regions.layer_masks(spec, 64, 48)
    assert [m.shape[1] for m in layers] == [h * w for h, w in regions.attention_sizes(64, 48)]
    assert layers[6].min() >= 0 and layers[6].max() <= 1
    # alpha < 128 is background, whatever its colour
    transparent = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    ImageDraw.Draw(transparent).rectangle((0, 0, 31, 47), fill=(0, 255, 0, 255))
    buf = io.BytesIO()
    transparent.save(buf, format="PNG")
    alpha_spec = RegionSpec([Region("g", color="#00ff00")], mask_image=base64.b64encode(buf.getvalue()).decode())
    assert torch.equal(regions.region_masks(alpha_spec, 64, 48)[0], red)
    assert regions.mask_colors(alpha_spec.mask_image) == ["#00ff00"]


def test_feathering():
    spec = RegionSpec([Region("a", box=(0, 0, 64, 32)), Region("b", box=(16, 40, 48, 64))])
    hard = regions.region_masks(spec, 64, 64)
    zero = RegionSpec(spec.regions, feather=0.0)
    assert torch.equal(regions.region_masks(zero, 64, 64), hard)
    soft_spec = RegionSpec(spec.regions, feather=1.5)
    soft = regions.region_masks(soft_spec, 64, 64)
    assert soft.min() >= 0 and soft.max() <= 1
    assert ((soft > 0) & (soft < 1)).any()
    # replicated borders: region a spans the full height, so the top and bottom rows stay as full as
    # the middle (zero padding would fade them)
    assert torch.equal(soft[0, 0], soft[0, 4]) and torch.equal(soft[0, -1], soft[0, 4])
    assert soft[0, 4, 3] < 1 and soft[0, 4, 4] > 0  # soft across the edge at column 4
    layers = regions.layer_masks(soft_spec, 64, 64)
    for m in layers:
        assert m.min() >= 0 and m.max() <= 1
    torch.testing.assert_close(layers[0], soft.flatten(1))


def test_hires_maps_the_first_pass_spec_to_the_new_size():
    mask = png_b64(64, 48, [((0, 0, 32, 48), "#ff0000")])
    spec = RegionSpec([Region("a", box=(0, 32, 24, 64)), Region("b", color="#ff0000")], mask_image=mask, feather=0)
    first = regions.region_masks(spec, 64, 48)
    second = regions.region_masks(spec, 128, 96, base_size=(64, 48))
    assert second.shape == (2, 12, 16)
    assert torch.equal(second, first.repeat_interleave(2, 1).repeat_interleave(2, 2))  # same place, twice the cells
    # the painted mask covers the whole image at any size; only px boxes need the first-pass size
    assert torch.equal(regions.region_masks(RegionSpec(spec.regions[1:], mask_image=mask), 128, 96), second[1:])
    layers = regions.layer_masks(spec, 128, 96, base_size=(64, 48))
    assert [m.shape[1] for m in layers] == [h * w for h, w in regions.attention_sizes(128, 96)]
    soft = RegionSpec(spec.regions, mask_image=mask, feather=1.0)
    a = regions.region_masks(soft, 64, 48)
    b = regions.region_masks(soft, 128, 96, base_size=(64, 48))
    # the feather radius scales with the latent: the 2x image blurs over twice the cells
    assert ((b > 0.01) & (b < 0.99)).sum() > 3 * ((a > 0.01) & (a < 0.99)).sum()


def test_no_regions_gives_empty_masks_of_every_layer_size():
    from lib_mos.regional.regions import RegionSpec, attention_sizes, layer_masks

    masks = layer_masks(RegionSpec(()), 64, 72)
    assert [tuple(m.shape) for m in masks] == [(0, h * w) for h, w in attention_sizes(64, 72)]
