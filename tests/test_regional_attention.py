"""Batched regional cross-attention equals the plain per-region definition (one attention and one
to_q/to_out per region, naive softmax, blended after to_out), in one layer and through the UNet."""

from __future__ import annotations

import pytest
import torch
from ldm.modules.attention import CrossAttention

from lib_mos.models import sd1
from lib_mos.models.attention import LayerwiseContext, attend, attn2_processor
from lib_mos.models.family import attn2_modules
from lib_mos.models.sampling import any_multiple_of_8
from lib_mos.regional import regions
from lib_mos.regional.attention import RegionalContext, regional_attention


def naive_attention(module: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The textbook definition, in float64: softmax(q k^T * scale) v, then to_out."""
    h = module.heads
    q, k, v = (t.double() for t in (module.to_q(x), module.to_k(context), module.to_v(context)))
    b, n, inner = q.shape
    q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
    out = ((q @ k.transpose(-1, -2)) * module.scale).softmax(-1) @ v
    w, bias = module.to_out[0].weight.double(), module.to_out[0].bias.double()
    return out.transpose(1, 2).reshape(b, n, inner) @ w.T + bias


def reference(module, x, context, region_context, masks) -> torch.Tensor:
    """Per-region loop: each region's full attention output (own to_q and to_out), weighted."""
    m = masks.double().clamp(0, 1)
    coverage = m.sum(1)
    out = (1 - coverage.clamp(max=1)).unsqueeze(-1) * naive_attention(module, x, context)
    for k in range(region_context.shape[1]):
        w = (m[:, k] / coverage.clamp(min=1)).unsqueeze(-1)
        out = out + w * naive_attention(module, x, region_context[:, k])
    return out


def layer(query_dim=16, context_dim=12, heads=2, seed=0) -> CrossAttention:
    torch.manual_seed(seed)
    module = CrossAttention(query_dim, context_dim=context_dim, heads=heads, dim_head=query_dim // heads).eval()
    with torch.no_grad():
        module.to_out[0].bias.normal_()
    return module


def random_masks(gen: torch.Generator, b: int, k: int, n: int) -> torch.Tensor:
    """Hard boxes, soft values, overlaps and all-zero rows/regions, mixed."""
    kind = torch.randint(0, 3, (b, k, 1), generator=gen)
    hard = (torch.rand(b, k, n, generator=gen) < 0.4).float()
    soft = torch.rand(b, k, n, generator=gen)
    masks = torch.where(kind == 0, hard, torch.where(kind == 1, soft, torch.zeros(b, k, n)))
    masks[0] = 0.0  # a row with no regions at all
    return masks


@torch.no_grad()
def test_matches_the_per_region_reference():
    module = layer()
    gen = torch.Generator().manual_seed(1)
    for k in range(1, 9):
        for t, tr in ((7, 7), (7, 11), (154, 77)):
            b, n = 3, 20
            x = torch.randn(b, n, 16, generator=gen)
            context = torch.randn(b, t, 12, generator=gen)
            region_context = torch.randn(b, k, tr, 12, generator=gen)
            masks = random_masks(gen, b, k, n)
            ours = regional_attention(module, x, context, region_context, masks)
            ref = reference(module, x, context, region_context, masks)
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5, msg=f"K={k} T={t} Tr={tr}")


@torch.no_grad()
@pytest.mark.parametrize("tr", [5, 9])
def test_outside_every_region_is_global_attention(tr):
    module = layer()
    gen = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 30, 16, generator=gen), torch.randn(2, 5, 12, generator=gen)
    region_context = torch.randn(2, 3, tr, 12, generator=gen)
    masks = torch.rand(2, 3, 30, generator=gen)
    masks[:, :, :10] = 0.0  # positions 0..9 lie outside every region
    masks[1] = 0.0  # row 1 has no regions
    ours = regional_attention(module, x, context, region_context, masks)
    glob = attend(module, x, context)
    assert (ours[:, :10] - glob[:, :10]).abs().max() <= 1e-6
    assert (ours[1] - glob[1]).abs().max() <= 1e-6
    assert (ours[0, 10:] - glob[0, 10:]).abs().max() > 1e-3  # and inside, the regions do act


@torch.no_grad()
def test_a_region_covering_everything_replaces_the_global_prompt():
    module = layer()
    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 24, 16, generator=gen), torch.randn(2, 7, 12, generator=gen)
    region_context = torch.randn(2, 3, 7, 12, generator=gen)
    masks = torch.zeros(2, 3, 24)
    masks[:, 1] = 1.0
    ours = regional_attention(module, x, context, region_context, masks)
    torch.testing.assert_close(ours, attend(module, x, region_context[:, 1]), rtol=1e-5, atol=1e-6)
    masks[:, 2] = 1.0  # two full regions: their average
    both = regional_attention(module, x, context, region_context, masks)
    mean = (attend(module, x, region_context[:, 1]) + attend(module, x, region_context[:, 2])) / 2
    torch.testing.assert_close(both, mean, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_no_regions_and_bad_shapes():
    module = layer()
    x, context = torch.randn(2, 6, 16), torch.randn(2, 5, 12)
    empty = regional_attention(module, x, context, torch.zeros(2, 0, 5, 12), torch.zeros(2, 0, 6))
    assert torch.equal(empty, attend(module, x, context))
    with pytest.raises(ValueError, match="do not line up"):
        regional_attention(module, x, context, torch.zeros(2, 2, 5, 12), torch.zeros(2, 2, 7))


# ------------------------------------------------------------------------------------------- UNet


@pytest.fixture(scope="module")
def unet():
    return sd1.build_tiny_sd1(seed=0).unet


def run_unet(unet, x, context, processor=None):
    t = torch.full((x.shape[0],), 500.0)
    with torch.no_grad(), any_multiple_of_8():
        if processor is None:
            return unet(x, t, context=context)
        with attn2_processor(unet, processor):
            return unet(x, t, context=context)


def full_weights(b: int, k: int, width: int, height: int, which: int | None) -> list[torch.Tensor]:
    out = []
    for h, w in regions.attention_sizes(width, height):
        m = torch.zeros(b, k, h * w)
        if which is not None:
            m[:, which] = 1.0
        out.append(m)
    return out


def test_unet_with_a_whole_image_region_equals_the_region_prompt(unet):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 9, 15, generator=gen)  # 72x120: not a multiple of 64
    context, region_context = torch.randn(2, 77, 32, generator=gen), torch.randn(2, 2, 77, 32, generator=gen)
    proc = RegionalContext(region_context, full_weights(2, 2, 120, 72, which=1))
    ours = run_unet(unet, x, context, proc)
    torch.testing.assert_close(ours, run_unet(unet, x, region_context[:, 1]), rtol=1e-4, atol=1e-4)
    # zero regions (and all-zero masks) are the plain UNet
    none = RegionalContext(torch.zeros(2, 0, 77, 32), full_weights(2, 0, 120, 72, which=None))
    torch.testing.assert_close(run_unet(unet, x, context, none), run_unet(unet, x, context), rtol=1e-4, atol=1e-4)
    zero = RegionalContext(region_context, full_weights(2, 2, 120, 72, which=None))
    torch.testing.assert_close(run_unet(unet, x, context, zero), run_unet(unet, x, context), rtol=1e-4, atol=1e-4)


def test_unet_layerwise_contexts(unet):
    """ED-LoRA binding: 4-D global and 5-D region contexts select their layer's slice."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 16, 77, 32, generator=gen)
    region_context = torch.randn(2, 16, 3, 77, 32, generator=gen)
    proc = RegionalContext(region_context, full_weights(2, 3, 64, 64, which=2))
    ours = run_unet(unet, x, context, proc)
    theirs = run_unet(unet, x, region_context[:, :, 2], LayerwiseContext())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # a plan's own context replaces the call's
    proc.set_rows(region_context, full_weights(2, 3, 64, 64, which=None), context=context)
    torch.testing.assert_close(run_unet(unet, x, torch.zeros(2, 77, 32), proc),
                               run_unet(unet, x, context, LayerwiseContext()), rtol=1e-4, atol=1e-4)


class NaiveRegional:
    """The reference as an attn2 processor: what the batched one must reproduce in the UNet."""

    def __init__(self, region_context, weights):
        self.region_context, self.weights = region_context, weights

    def __call__(self, module, layer, x, context):
        return reference(module, x, context, self.region_context, self.weights[layer]).float()


def test_unet_with_box_regions_matches_the_reference(unet):
    width, height = 120, 72
    spec = regions.RegionSpec.from_json(
        "[a cat]-*-[]-*-[0, 0, 72, 64]|[a dog]-*-[]-*-[8, 48, 64, 120]"  # overlapping columns 48..64
    )
    masks = regions.layer_masks(spec, width, height)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, height // 8, width // 8, generator=gen)
    context, region_context = torch.randn(2, 77, 32, generator=gen), torch.randn(2, 2, 77, 32, generator=gen)
    weights = [m.unsqueeze(0).expand(2, -1, -1) for m in masks]
    ours = run_unet(unet, x, context, RegionalContext(region_context, masks))
    ref = run_unet(unet, x, context, NaiveRegional(region_context, weights))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - run_unet(unet, x, context)).abs().max() > 1e-2


def test_plan_errors_and_hooks_are_removed(unet):
    modules = [m for _, m in attn2_modules(unet)]
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    wrong_batch = RegionalContext(torch.zeros(3, 1, 77, 32), full_weights(3, 1, 64, 64, which=0))
    with pytest.raises(ValueError, match="row plan 3 rows"):
        run_unet(unet, x, context, wrong_batch)
    wrong_size = RegionalContext(torch.zeros(2, 1, 77, 32), full_weights(2, 1, 128, 64, which=0))
    with pytest.raises(ValueError, match="positions"):
        run_unet(unet, x, context, wrong_size)
    with pytest.raises(RuntimeError, match="no row plan"):
        run_unet(unet, x, context, RegionalContext())
    assert all("forward" not in m.__dict__ for m in modules)
    with pytest.raises(ValueError, match="layers"):
        RegionalContext(torch.zeros(2, 15, 1, 77, 32), full_weights(2, 1, 64, 64, which=0))
    with pytest.raises(ValueError, match="do not match"):
        RegionalContext(torch.zeros(2, 2, 77, 32), full_weights(2, 1, 64, 64, which=0))


# ---------------------------------------------------------------------------------------- timing


def authors_loop(module, x, context, region_context, masks):
    """What the authors run: per region a full attention (to_q, einsum softmax, to_out), blended."""
    def one(ctx):
        h = module.heads
        q, k, v = module.to_q(x), module.to_k(ctx), module.to_v(ctx)
        b, n, inner = q.shape
        q, k, v = (t.reshape(b, -1, h, inner // h).transpose(1, 2).flatten(0, 1) for t in (q, k, v))
        sim = torch.einsum("bid,bjd->bij", q, k) * module.scale
        out = torch.einsum("bij,bjd->bid", sim.softmax(-1), v)
        return module.to_out(out.unflatten(0, (b, h)).transpose(1, 2).reshape(b, n, inner))

    coverage = masks.sum(1)
    out = (1 - coverage.clamp(max=1)).unsqueeze(-1) * one(context)
    for k in range(region_context.shape[1]):
        out = out + (masks[:, k] / coverage.clamp(min=1)).unsqueeze(-1) * one(region_context[:, k])
    return out


@torch.no_grad()
def test_batched_equals_loop_at_sd15_layer0_size():
    """SD1.5 layer 0 at 512x512, a CFG batch, 4 overlapping regions (timings: bench/regional.py)."""
    module = CrossAttention(320, context_dim=768, heads=8, dim_head=40).eval()
    gen = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 4096, 320, generator=gen), torch.randn(2, 77, 768, generator=gen)
    region_context = torch.randn(2, 4, 77, 768, generator=gen)
    masks = torch.zeros(2, 4, 64, 64)
    for k in range(4):
        masks[:, k, :, 16 * k:16 * k + 24] = 1.0  # overlapping vertical bands
    masks = masks.flatten(2)
    torch.testing.assert_close(regional_attention(module, x, context, region_context, masks),
                               authors_loop(module, x, context, region_context, masks), rtol=1e-4, atol=1e-4)


def test_region_keys_and_values_are_projected_once_per_plan(unet, monkeypatch):
    """Sampling projects each distinct region context once per layer, not once per step or per row:
    a second UNet call with the same plan projects nothing, distinct contexts picked by `rows`
    give what per-row contexts give, and a weight changed in place (the host's Lora) is seen."""
    from lib_mos.regional import attention as regional

    calls = []
    original = regional.region_keys_values

    def counting(module, region_context, context_delta=None):
        calls.append(region_context.shape[0])
        return original(module, region_context, context_delta)

    monkeypatch.setattr(regional, "region_keys_values", counting)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    context = torch.randn(4, 77, 32, generator=gen)
    distinct = torch.randn(2, 3, 77, 32, generator=gen)  # [cond set, uncond set]
    rows = torch.tensor([0, 0, 1, 1])
    masks = regions.layer_masks(regions.RegionSpec.from_json(
        "[a]-*-[]-*-[0, 0, 64, 32]|[b]-*-[]-*-[0, 32, 64, 64]|[c]-*-[]-*-[16, 16, 48, 48]"), 64, 64)
    proc = RegionalContext()
    proc.set_rows(distinct, masks, rows=rows)
    first = run_unet(unet, x, context, proc)
    active = sum(proc._active)  # layers where some region has cells (at 1x1 the boxes vanish)
    assert active >= 14 and calls == [2] * active  # each layer projects the two distinct contexts once
    second = run_unet(unet, x, context, proc)
    assert calls == [2] * active and torch.equal(first, second)
    per_row = run_unet(unet, x, context, RegionalContext(distinct[rows], masks))
    torch.testing.assert_close(first, per_row, rtol=1e-5, atol=1e-5)
    to_k = attn2_modules(unet)[5][1].to_k.weight
    saved = to_k.detach().clone()
    calls.clear()
    try:
        with torch.no_grad():
            to_k.mul_(1.5)  # in place, as the host's Lora changes weights
        changed = run_unet(unet, x, context, proc)
        assert calls == [2] and (changed - first).abs().max() > 1e-4  # that layer only
    finally:
        with torch.no_grad():
            to_k.copy_(saved)
    proc.clear_rows()
    assert not proc._kv
