"""Region passes (lib_mos.regional.passes): each region with LoRAs in a UNet pass of its own, the
predictions blended by region, so what one region's LoRA does cannot reach another region."""

from __future__ import annotations

import pytest
import torch

from lib_mos.concepts import binding
from lib_mos.concepts.synthetic import random_concept
from lib_mos.models import sampling, sd1
from lib_mos.models.family import attn2_modules
from lib_mos.regional.attention import RegionalContext
from lib_mos.regional.loras import RegionDeltas, RegionLora
from lib_mos.regional.passes import only_regions, plan_passes, region_passes
from lib_mos.regional.regions import Region, RegionSpec, layer_masks, level_masks, region_masks

WIDTH, HEIGHT = 128, 64  # latent 8 x 16: region 0 is latent columns 0-7, region 1 columns 8-15


def halves(background: float = 0.0) -> RegionSpec:
    """Two regions side by side; `background` leaves that share of the image around them."""
    m = background
    return RegionSpec((Region("a cat", negative="dark", box=(m, m, 1 - m, 0.5 - m), units="fraction"),
                       Region("a dog", box=(m, 0.5 + m, 1 - m, 1 - m), units="fraction")))


def lora(model: sd1.SD1Model, region: int, seed: int, weight: float = 1.0) -> RegionLora:
    concept = random_concept(model, (f"<a{seed}>", f"<b{seed}>"), seed=seed, scale=3.0, name=f"c{seed}")
    return RegionLora(region, concept, weight, concept.name)


@pytest.fixture(scope="module")
def model() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


def test_each_region_with_a_lora_gets_a_pass_and_the_rest_one_more(model):
    latent = region_masks(halves(), WIDTH, HEIGHT).flatten(1)
    tiled = plan_passes(latent, [lora(model, 1, 1), lora(model, 0, 2), lora(model, 0, 3)])
    assert [p.regions for p in tiled] == [(0,), (1,)]  # the LoRA regions tile the canvas: no rest pass
    assert [len(p.loras) for p in tiled] == [2, 1]
    assert torch.equal(tiled[0].share.reshape(8, 16)[:, :8], torch.ones(8, 8))
    assert torch.equal(tiled[0].share.reshape(8, 16)[:, 8:], torch.zeros(8, 8))

    one = plan_passes(latent, [lora(model, 1, 1), lora(model, 0, 2, weight=0.0)])
    assert [p.regions for p in one] == [(1,), (0,)]  # a LoRA at weight 0 changes nothing: region 0 in the rest
    assert torch.equal(one[1].share.reshape(8, 16)[:, :8], torch.ones(8, 8))

    framed = plan_passes(region_masks(halves(0.125), WIDTH, HEIGHT).flatten(1), [lora(model, 0, 1), lora(model, 1, 2)])
    assert [p.regions for p in framed] == [(0,), (1,), ()]  # the background is the global prompt's pass
    torch.testing.assert_close(sum(p.share for p in framed), torch.ones(8 * 16))
    assert all(bool((p.share >= 0).all()) for p in framed)

    with pytest.raises(ValueError, match="regions"):
        plan_passes(latent, [lora(model, 2, 1)])


def test_masks_keep_every_slot_and_only_the_pass_regions():
    spec = halves()
    layers = layer_masks(spec, WIDTH, HEIGHT)
    kept = only_regions(layers, (1,))
    assert [m.shape for m in kept] == [m.shape for m in layers]
    assert all(not m[0].any() and torch.equal(m[1], full[1]) for m, full in zip(kept, layers))
    levels = only_regions(level_masks(spec, WIDTH, HEIGHT), (0,))
    assert all(m[0].any() and not m[1].any() for m in levels.values())


def predictions(model, passes_or_processor, x, sigma, cond, uncond):
    step = sampling.Denoiser(model, cond, uncond, 7.5)
    with torch.no_grad(), sampling.any_multiple_of_8():
        if isinstance(passes_or_processor, list):
            return step.blended(x, sigma, [run.sampling_pass() for run in passes_or_processor])
        with step.attention(passes_or_processor):
            return step(x, sigma)


def setup_rows(model, spec: RegionSpec, runs, processor: RegionalContext | None = None):
    region_rows = torch.stack([binding.encode_prompts(model, [r.text, r.negative]) for r in spec.regions], dim=1)
    for run in runs:
        run.set_rows(region_rows)
    if processor is not None:
        processor.set_rows(region_rows, layer_masks(spec, WIDTH, HEIGHT))


def first_region_alone(model, spec: RegionSpec, loras, levels, x, sigma, cond, uncond) -> torch.Tensor:
    """The prediction of a generation with the spec's region 0 only, `loras` (all on region 0)
    inside it, the global prompt elsewhere: what region 0's pass must give inside region 0."""
    processor, deltas = RegionalContext(), RegionDeltas(model.unet, loras, 1)
    deltas.set_masks({size: m[:1] for size, m in levels.items()})
    processor.context_delta = deltas.context_delta
    setup_rows(model, RegionSpec(spec.regions[:1]), [], processor)
    with deltas.installed():
        return predictions(model, processor, x, sigma, cond, uncond)


def test_a_regions_prediction_does_not_depend_on_the_other_regions_lora(model):
    """Inside region 0 the blended prediction is region 0's pass: swapping region 1's LoRA for
    another changes region 1 and nothing in region 0 (one pass lets it through the UNet)."""
    spec = halves()
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    x = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.tensor(5.0)
    levels, layers = level_masks(spec, WIDTH, HEIGHT), layer_masks(spec, WIDTH, HEIGHT)
    latent = region_masks(spec, WIDTH, HEIGHT)
    out = {}
    for other in (2, 3):
        loras = [lora(model, 0, 1), lora(model, 1, other)]
        runs = region_passes(model.unet, loras, levels, layers, latent)
        setup_rows(model, spec, runs)
        out[("passes", other)] = predictions(model, runs, x, sigma, cond, uncond)
        one = RegionalContext()
        deltas = RegionDeltas(model.unet, loras, 2)
        deltas.set_masks(levels)
        one.context_delta = deltas.context_delta
        setup_rows(model, spec, [], one)
        with deltas.installed():
            out[("one", other)] = predictions(model, one, x, sigma, cond, uncond)
    left, right = (slice(None), slice(None), slice(None), slice(0, 8)), (slice(None),) * 3 + (slice(8, 16),)
    assert torch.equal(out[("passes", 2)][left], out[("passes", 3)][left])
    assert (out[("passes", 2)][right] - out[("passes", 3)][right]).abs().max() > 1e-2
    assert (out[("one", 2)][left] - out[("one", 3)][left]).abs().max() > 1e-3  # what passes remove


def test_inside_its_region_a_pass_is_that_regions_lora_and_prompt_alone(model):
    """Region 0's share is the prediction of a generation with region 0 only (its prompt and its
    LoRA inside it, the global prompt elsewhere) - not region 1's pass, which a mirrored share
    would give."""
    spec = halves()
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    x = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(1)) * 5
    sigma = torch.tensor(5.0)
    levels, layers = level_masks(spec, WIDTH, HEIGHT), layer_masks(spec, WIDTH, HEIGHT)
    loras = [lora(model, 0, 1), lora(model, 1, 2)]
    runs = region_passes(model.unet, loras, levels, layers, region_masks(spec, WIDTH, HEIGHT))
    setup_rows(model, spec, runs)
    blended = predictions(model, runs, x, sigma, cond, uncond)

    reference = first_region_alone(model, spec, loras[:1], levels, x, sigma, cond, uncond)
    torch.testing.assert_close(blended[..., :8], reference[..., :8], rtol=1e-5, atol=1e-5)
    assert (blended[..., 8:] - reference[..., 8:]).abs().max() > 1e-2


def test_sampling_with_passes_leaves_the_model_as_it_was(model):
    spec = halves(0.125)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    runs = region_passes(model.unet, [lora(model, 0, 1), lora(model, 1, 2)], level_masks(spec, WIDTH, HEIGHT),
                         layer_masks(spec, WIDTH, HEIGHT), region_masks(spec, WIDTH, HEIGHT))
    assert len(runs) == 3
    setup_rows(model, spec, runs)
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    latents = sampling.sample_euler(model, cond, uncond, seeds=[4], height=HEIGHT, width=WIDTH, steps=2,
                                    cfg_scale=7.5, passes=[run.sampling_pass() for run in runs])
    assert latents.shape == (1, 4, 8, 16) and bool(torch.isfinite(latents).all())
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
    assert all("forward" not in m.__dict__ for _, m in attn2_modules(model.unet))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.unet.modules())
    with pytest.raises(ValueError, match="either"):
        sampling.sample_euler(model, cond, uncond, seeds=[4], height=HEIGHT, width=WIDTH, steps=1,
                              processor=RegionalContext(), passes=[runs[0].sampling_pass()])


def test_one_pass_for_the_whole_image_is_plain_regional_sampling(model):
    spec = halves()
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    runs = region_passes(model.unet, [], level_masks(spec, WIDTH, HEIGHT), layer_masks(spec, WIDTH, HEIGHT),
                         region_masks(spec, WIDTH, HEIGHT))
    processor = RegionalContext()
    setup_rows(model, spec, runs, processor)
    kwargs = dict(seeds=[5], height=HEIGHT, width=WIDTH, steps=2, cfg_scale=7.5)
    one = sampling.sample_euler(model, cond, uncond, processor=processor, **kwargs)
    passes = sampling.sample_euler(model, cond, uncond, passes=[r.sampling_pass() for r in runs], **kwargs)
    assert torch.equal(one, passes)


def test_switching_the_source_of_lora_changes_never_reuses_the_others_keys(model):
    """Region passes switch one processor's `context_delta` between passes, call after call: the
    kept region keys and values must be each source's own (a freed bound method's address is
    soon reused by the next one, so a key by address alone would hand one pass the other's)."""
    spec = halves()
    levels = level_masks(spec, WIDTH, HEIGHT)
    sources = []
    for seed in (1, 2):
        deltas = RegionDeltas(model.unet, [lora(model, 0, seed)], 2)
        deltas.set_masks(levels)
        sources.append(deltas)
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    x = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(2)) * 5
    shared = RegionalContext()
    setup_rows(model, spec, [], shared)
    for deltas in [*sources, *sources]:
        fresh = RegionalContext()
        setup_rows(model, spec, [], fresh)
        shared.context_delta, fresh.context_delta = deltas.context_delta, deltas.context_delta
        with deltas.installed():
            got = predictions(model, shared, x, torch.tensor(5.0), cond, uncond)
            want = predictions(model, fresh, x, torch.tensor(5.0), cond, uncond)
        shared.context_delta = fresh.context_delta = None  # as between two host calls: the method is freed
        assert torch.equal(got, want)


def test_a_pass_gives_its_loras_unet_layers_their_share_and_keeps_keys_and_values_whole(model):
    """With the spec's `pass_unet_weight` s, region 0's share is what its LoRA gives with every UNet
    layer at s of its weight but attn2's to_k / to_v (they read the region's own prompt) at the
    full weight; a weight ignored, or given to the keys and values instead, fails."""
    from lib_mos.toyworld.measure import concept_part

    spec = halves()
    cond, uncond = binding.encode_prompts(model, ["a cat and a dog"]), binding.encode_prompts(model, [""])
    x = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3)) * 5
    sigma = torch.tensor(5.0)
    levels, layers = level_masks(spec, WIDTH, HEIGHT), layer_masks(spec, WIDTH, HEIGHT)
    loras = [lora(model, 0, 1), lora(model, 1, 2)]
    blended = {}
    for share in (0.25, 1.0):
        runs = region_passes(model.unet, loras, levels, layers, region_masks(spec, WIDTH, HEIGHT), unet_weight=share)
        setup_rows(model, spec, runs)
        blended[share] = predictions(model, runs, x, sigma, cond, uncond)

    def alone(spatial: float, kv: float) -> torch.Tensor:
        concept = loras[0].concept
        parts = [RegionLora(0, concept_part(concept, "spatial"), spatial, "spatial"),
                 RegionLora(0, concept_part(concept, "kv"), kv, "kv")]
        return first_region_alone(model, spec, parts, levels, x, sigma, cond, uncond)[..., :8]

    torch.testing.assert_close(blended[0.25][..., :8], alone(0.25, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blended[1.0][..., :8], alone(1.0, 1.0), rtol=1e-5, atol=1e-5)
    assert (blended[0.25][..., :8] - alone(1.0, 0.25)).abs().max() > 1e-3
    assert (blended[0.25][..., :8] - blended[1.0][..., :8]).abs().max() > 1e-3
