"""Regional sampling on the SDXL test model: region prompts set the cross-attention context where
they are drawn (all 70 layers, both text encoders' widths), the pooled vector stays the main
prompt's, and region LoRAs in one pass equal the LoRA merged when the region covers the image."""

from __future__ import annotations

import lora_layouts as layouts
import pytest
import torch
from test_regional_attention import NaiveRegional

from lib_mos.concepts.binding import tokenize
from lib_mos.concepts.files import read_concept
from lib_mos.models import sdxl
from lib_mos.models.attention import attn2_processor
from lib_mos.models.family import SDXL
from lib_mos.models.sampling import any_multiple_of_8, sample_euler
from lib_mos.regional import regions
from lib_mos.regional.attention import RegionalContext
from lib_mos.regional.loras import RegionDeltas, RegionLora

WIDTH, HEIGHT = 96, 64  # latent 12x8; SDXL's attention sees 6x4 and 3x2


@pytest.fixture(scope="module")
def xl() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(seed=0)


def encode(model: sdxl.SDXLModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    return model.encode_ids(tokenize(model, prompts), WIDTH, HEIGHT)


def unet(model, x, cond, processor=None) -> torch.Tensor:
    t = torch.full((x.shape[0],), 400.0)
    with torch.no_grad(), any_multiple_of_8():
        if processor is None:
            return model.unet(x, t, context=cond["crossattn"], y=cond["vector"])
        with attn2_processor(model.unet, processor):
            return model.unet(x, t, context=cond["crossattn"], y=cond["vector"])


def test_a_whole_image_region_sets_the_context_and_the_vector_stays_the_main_prompts(xl):
    """Sampling with global "a green triangle" and one region "a red circle" over the whole image
    is sampling with the region's context and the main prompt's pooled vector."""
    main, region, negative = encode(xl, ["a green triangle"]), encode(xl, ["a red circle"]), encode(xl, [""])
    spec = regions.RegionSpec((regions.Region("a red circle", box=(0.0, 0.0, 1.0, 1.0), units="fraction"),))
    masks = regions.layer_masks(spec, WIDTH, HEIGHT, family=SDXL)
    rows = torch.cat([region["crossattn"], negative["crossattn"]]).unsqueeze(1)  # cond row, uncond row
    proc = RegionalContext(rows, masks)
    kw = {"seeds": [3], "height": HEIGHT, "width": WIDTH, "steps": 3, "cfg_scale": 5.0}
    with torch.no_grad():
        ours = sample_euler(xl, main, negative, processor=proc, **kw)
        want = sample_euler(xl, {"crossattn": region["crossattn"], "vector": main["vector"]}, negative, **kw)
        plain = sample_euler(xl, main, negative, **kw)
    assert ((ours - want).norm() / want.norm()).item() < 1e-5  # relative, after the sampling loop
    assert (ours - plain).abs().max() > 1e-2


def test_box_regions_through_all_70_layers_match_the_per_region_reference(xl):
    spec = regions.RegionSpec.from_json("[a cat]-*-[]-*-[0, 0, 64, 56]|[a dog]-*-[]-*-[8, 40, 64, 96]")
    masks = regions.layer_masks(spec, WIDTH, HEIGHT, family=SDXL)
    assert len(masks) == 70
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    cond = {"crossattn": torch.randn(2, 77, xl.config.context_dim, generator=gen),
            "vector": torch.randn(2, xl.config.vector_dim, generator=gen)}
    region_context = torch.randn(2, 2, 77, xl.config.context_dim, generator=gen)
    ours = unet(xl, x, cond, RegionalContext(region_context, masks))
    ref = unet(xl, x, cond, NaiveRegional(region_context, [m.unsqueeze(0).expand(2, -1, -1) for m in masks]))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - unet(xl, x, cond)).abs().max() > 1e-2


def test_a_region_lora_in_one_pass_equals_the_lora_merged(xl, tmp_path):
    """A whole-image region with a LoCon (convs at level 0, attention at levels 1-2, both text
    encoders) is the LoRA merged, text side included: its context and, through `vector_changes`,
    its pooled vector are the prompt encoded with the LoRA; weight 0 is the base model bit for bit."""
    from test_region_loras import merged

    lora = read_concept(layouts.kohya_locon(xl, few=True, seed=5).save(tmp_path, "x"), trigger="", family=SDXL)
    spec = regions.RegionSpec((regions.Region("x", box=(0.0, 0.0, 1.0, 1.0), units="fraction"),))
    masks = regions.layer_masks(spec, WIDTH, HEIGHT, family=SDXL)
    ids = tokenize(xl, ["a red circle"])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    with torch.no_grad():
        with merged(xl, lora, 0.8):
            want = unet(xl, x, xl.encode_ids(ids, WIDTH, HEIGHT))
        text = RegionDeltas(xl.text_root, [RegionLora(0, lora, 0.8)], 1, masked=False, text=True)
        with text.installed():
            region_cond = xl.encode_ids(ids, WIDTH, HEIGHT)
        cond = xl.encode_ids(ids, WIDTH, HEIGHT)
        deltas = RegionDeltas(xl.unet, [RegionLora(0, lora, 0.8)], 1, vectors=True)
        deltas.set_masks(regions.level_masks(spec, WIDTH, HEIGHT, family=SDXL))
        rows = []
        # the UNet gets the main vector; the region's own (bigG changed) comes as a change per region
        deltas.vector_changes = lambda n: rows.append(n) or (region_cond["vector"] - cond["vector"]).unsqueeze(1)
        proc = RegionalContext(region_cond["crossattn"].unsqueeze(1), masks)
        proc.context_delta = deltas.context_delta
        with deltas.installed():
            got = unet(xl, x, cond, proc)
        assert rows == [1]
        assert not torch.equal(region_cond["vector"], cond["vector"])
        base = unet(xl, x, cond)
        zero = RegionDeltas(xl.unet, [RegionLora(0, lora, 0.0)], 1)
        assert not zero
        with zero.installed():
            assert torch.equal(unet(xl, x, cond), base)
    assert (want - base).norm() > 1e-2 * base.norm()
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_each_regions_vector_reaches_the_blocks_only_inside_it(xl, tmp_path):
    """Two regions with their own vector input (and region 1 a LoRA on the vector MLP): the first
    ResBlock's feature map is, inside region r, the UNet's with r's vector (and LoRA), and outside
    every region the UNet's with the main vector; a change given to the wrong region would fail."""
    from test_region_loras import (
        SPEC,
        WEIGHTS,
        assert_by_region,
        level0,
        merged,
        only_time_embedding,
        positions,
    )

    lora = read_concept(only_time_embedding(layouts.loha(xl, seed=12, few=True)).save(tmp_path, "v"), trigger="",
                        family=SDXL)
    gen = torch.Generator().manual_seed(11)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500.0, 20.0])
    context = torch.randn(2, 77, xl.config.context_dim, generator=gen)
    y = torch.randn(2, xl.config.vector_dim, generator=gen)
    changes = torch.randn(2, 2, xl.config.vector_dim, generator=gen)  # [rows, regions, V]
    block = xl.unet.get_submodule("input_blocks.1.0")
    seen: list[torch.Tensor] = []

    def feature_map(vector: torch.Tensor) -> torch.Tensor:
        handle = block.out_layers.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            xl.unet(x, t, context=context, y=vector)
        finally:
            handle.remove()
        return positions(seen.pop(), True)

    deltas = RegionDeltas(xl.unet, [RegionLora(1, lora, WEIGHTS[1])], 2, vectors=True)
    deltas.set_masks(regions.level_masks(SPEC, 64, 64, family=SDXL))
    deltas.vector_changes = lambda n: changes[:n]
    with torch.no_grad():
        base = feature_map(y)
        only = [feature_map(y + changes[:, 0])]
        with merged(xl, lora, WEIGHTS[1]):
            only.append(feature_map(y + changes[:, 1]))
        with deltas.installed():
            got = feature_map(y)
    assert_by_region(got, base, only, level0(xl), "vector per region")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in xl.unet.modules())
