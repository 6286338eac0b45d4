"""Regions land where they are drawn, judged on the generated images (product level): a region
changes its own area more than anywhere else, for a box and for a painted mask, in the first pass
and in the hires pass; the hires pass binds the hires prompts; each prompt is encoded once per
generation."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_mos.concepts import binding, synthetic
from lib_mos.concepts.files import write_concept
from lib_mos.models import sd1

WITH_EXTENSION = True  # the `host` fixture installs this extension
WIDTH, HEIGHT = 128, 96  # not square, so a transposed mask cannot land on the same cells
BOX = (8, 24, 40, 56)  # top, left, bottom, right in pixels: away from its mirror and transposed images


def painted_box(color: tuple[int, int, int] = (255, 0, 0)) -> str:
    """A mask image (data URL) painted at half the image size: the box in `color`, black elsewhere."""
    pixels = np.zeros((HEIGHT // 2, WIDTH // 2, 3), dtype=np.uint8)
    top, left, bottom, right = (v // 2 for v in BOX)
    pixels[top:bottom, left:right] = color
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


SPECS = {
    "box": {"regions": [{"prompt": "a bright yellow lemon, studio light", "box": list(BOX)}]},
    "painted": {"mask_image": painted_box(),
                "regions": [{"prompt": "a bright yellow lemon, studio light", "color": "#ff0000"}]},
}


def change_map(a, b) -> torch.Tensor:
    """Per latent cell, how much the final latent changed: [h, w]."""
    return (a.images[0].latent - b.images[0].latent).abs().mean(0)


def area_means(change: torch.Tensor) -> dict[str, float]:
    """Mean change inside the drawn box, in its left-right and top-bottom mirror images, in the
    transposed box, and everywhere outside it, on the latent grid of `change`."""
    h, w = change.shape
    top, left, bottom, right = (round(v * s) for v, s in zip(BOX, (h / HEIGHT, w / WIDTH, h / HEIGHT, w / WIDTH)))
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    mirror_x = inside.flip(1)
    mirror_y = inside.flip(0)
    transposed = torch.zeros(h, w, dtype=torch.bool)
    transposed[left:min(right, h), top:min(bottom, w)] = True  # rows and columns swapped
    return {"inside": change[inside].mean().item(), "mirrored left-right": change[mirror_x & ~inside].mean().item(),
            "mirrored top-bottom": change[mirror_y & ~inside].mean().item(),
            "transposed": change[transposed & ~inside].mean().item(), "outside": change[~inside].mean().item()}


@pytest.mark.parametrize("shape", list(SPECS))
@pytest.mark.parametrize("hires", [False, True], ids=["first pass", "hires pass"])
def test_a_region_changes_its_own_area_most(host, shape, hires):
    fields = dict(width=WIDTH, height=HEIGHT, steps=4, seed=3)
    if hires:
        fields.update(enable_hr=True, hr_scale=1.5, denoising_strength=0.7)
    plain = host.txt2img("a photo of a dark forest", **fields)
    regional = host.txt2img("a photo of a dark forest", script_args=host.script_args("Mix-of-Show", json.dumps(SPECS[shape])),
                            **fields)
    change = change_map(regional, plain)
    scale = 1.5 if hires else 1.0
    assert change.shape == (int(HEIGHT * scale) // 8, int(WIDTH * scale) // 8)
    means = area_means(change)
    for where in ("mirrored left-right", "mirrored top-bottom", "transposed", "outside"):
        assert means["inside"] > 1.5 * means[where], means


@pytest.fixture
def cat(host):
    from modules import shared

    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    concept = synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4, name="cat")
    write_concept(concept, Path(shared.cmd_opts.lora_dir) / "cat.safetensors")
    return model, concept


def test_hires_pass_binds_the_hires_prompt(host, cat, monkeypatch):
    from lib_mos.regional import attention
    from modules import shared

    model, concept = cat
    seen: list[tuple[int, torch.Tensor | None]] = []
    original = attention.SteppedRegionalContext.set_step

    def spy(self, region_context, weights, context=None, *rest):
        seen.append((weights[0].shape[-1], None if context is None else context[0].clone()))
        return original(self, region_context, weights, context, *rest)

    monkeypatch.setattr(attention.SteppedRegionalContext, "set_step", spy)
    host.txt2img("a photo of <cat1> <cat2>", width=64, height=64, steps=2, seed=1, enable_hr=True, hr_scale=2.0,
                 denoising_strength=0.6, hr_prompt="a painting of <cat1> <cat2>")
    first, hires = binding.PromptBinder(model, [concept]).encode(["a photo of <cat1> <cat2>",
                                                                   "a painting of <cat1> <cat2>"])
    first_pass = [ctx for cells, ctx in seen if cells == 8 * 8]
    hires_pass = [ctx for cells, ctx in seen if cells == 16 * 16]
    assert first_pass and hires_pass and len(seen) == len(first_pass) + len(hires_pass)
    assert shared.opts.hires_fix_use_firstpass_conds is False
    for ctx in first_pass:
        torch.testing.assert_close(ctx, first, rtol=1e-4, atol=1e-4)
    for ctx in hires_pass:
        torch.testing.assert_close(ctx, hires, rtol=1e-4, atol=1e-4)


def test_each_prompt_is_encoded_once_per_generation(host, cat, monkeypatch):
    """First pass and hires pass with the same prompts and regions: every distinct text goes
    through the host's encoder once, however many steps and passes there are."""
    texts: list[str] = []
    original = type(host.model).get_learned_conditioning

    def counting(self, batch):
        texts.extend(batch)
        return original(self, batch)

    spec = json.dumps({"regions": [{"prompt": "<cat1> <cat2> on a rug", "negative": "dark", "box": [0, 0, 32, 64]}]})
    host.txt2img("warm <cat1> <cat2>", "cold", width=64, height=64, steps=3, seed=2, enable_hr=True, hr_scale=1.5,
                 denoising_strength=0.5, script_args=host.script_args("Mix-of-Show", spec))
    monkeypatch.setattr(type(host.model), "get_learned_conditioning", counting)
    host.txt2img("warm <cat1> <cat2>", "cold", width=64, height=64, steps=3, seed=2, enable_hr=True, hr_scale=1.5,
                 denoising_strength=0.5, script_args=host.script_args("Mix-of-Show", spec))
    ours = [t for t in texts if "mosbind" in t or t in ("dark",)]
    layers = len(sd1.ATTN2_NAMES)
    # two bound texts (the main prompt and the region prompt), 16 layer copies each, and "dark" once
    assert len(ours) == 2 * layers + 1, ours
