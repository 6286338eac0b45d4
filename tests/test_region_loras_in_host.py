"""Region LoRAs through the Mix-of-Show script in the host double: a region covering the image with
LoRA X samples what the host's own `<lora:X>` samples, in every batching mode; weight 0 is no LoRA;
tags, listed LoRAs and concept tokens bring the same LoRA; bad names fail before sampling with
nothing hooked; the global prompt's weight inside regions."""

from __future__ import annotations

import json
from pathlib import Path

import lora_layouts as layouts
import pytest
import torch
from test_regional_script import MODES

from lib_mos.concepts import synthetic
from lib_mos.concepts.concept import ConceptError
from lib_mos.concepts.files import write_concept
from lib_mos.models import sd1
from lib_mos.regional.regions import RegionError

WITH_EXTENSION = True
PROMPT, NEGATIVE = "a photo of a cat", "blurry"
WHOLE_BOX = {"box": [0, 0, 1, 1], "units": "fraction"}


def latents(res) -> torch.Tensor:
    return torch.stack([im.latent for im in res.images])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def nothing_hooked(host) -> bool:
    model = host.model
    modules = [*model.model.diffusion_model.modules(), *model.cond_stage_model.modules()]
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in modules)


def whole(prompt: str = PROMPT, negative: str = NEGATIVE, **region) -> str:
    return json.dumps({"regions": [{"prompt": prompt, "negative": negative, **WHOLE_BOX, **region}]})


def lora_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.lora_dir)


@pytest.fixture
def locon(host, tiny_checkpoint) -> str:
    """A float32 kohya LoCon (attention, convs, time_emb_proj, text encoder) in the Lora folder."""
    model = sd1.load_checkpoint(tiny_checkpoint)
    layouts.kohya_locon(model, dtype=torch.float32, seed=7).save(lora_dir(), "x")
    return "x"


def batching_mode(mode: str) -> tuple[str, dict]:
    """Set the host's options for one of `MODES`: the prompt (long where the mode says) and the
    txt2img fields of a two-image batch."""
    from modules import shared

    options, fields = MODES[mode]
    fields = dict(fields)
    long = fields.pop("long", False)
    for k, v in options.items():
        setattr(shared.opts, k, v)
    return (", ".join([PROMPT] * 12) if long else PROMPT), dict(batch_size=2, width=64, height=72, **fields)


def run(host, spec: str, prompt: str = PROMPT, negative: str = NEGATIVE, **fields):
    fields.setdefault("steps", 4)
    fields.setdefault("seed", 5)
    return host.txt2img(prompt, negative, script_args=host.script_args("Mix-of-Show", spec), **fields)


@pytest.mark.parametrize("mode", list(MODES))
def test_whole_image_region_lora_samples_as_the_hosts_own_lora(host, locon, mode):
    """The same script and region either way: once the LoRA is the region's (our hooks), once the
    host's `<lora:x:1>` in the main prompt (weights merged by the built-in Lora)."""
    prompt, common = batching_mode(mode)
    ours = run(host, whole(prompt, loras=[{"name": locon, "weight": 1}]), prompt, **common)
    hosts = run(host, whole(prompt), f"{prompt} <lora:{locon}:1>", **common)
    plain = run(host, whole(prompt), prompt, **common)
    assert relative(latents(hosts), latents(plain)) > 1e-2  # the LoRA matters
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert nothing_hooked(host)


def test_the_hosts_own_lora_keeps_working_alongside(host, locon, tiny_checkpoint):
    """x through the host's <lora:x> on the whole image and y in a region covering it: the same as
    both as region LoRAs (the host merges x into the weights, the hooks add y to the outputs)."""
    model = sd1.load_checkpoint(tiny_checkpoint)
    layouts.kohya_lora(model, dtype=torch.float32, seed=8).save(lora_dir(), "y")
    both_hooked = run(host, whole(loras=[{"name": locon}, {"name": "y", "weight": 0.7}]))
    alongside = run(host, whole(loras=[{"name": "y", "weight": 0.7}]), f"{PROMPT} <lora:{locon}:1>")
    only_y = run(host, whole(loras=[{"name": "y", "weight": 0.7}]))
    assert relative(latents(alongside), latents(only_y)) > 1e-2
    assert relative(latents(alongside), latents(both_hooked)) < 1e-5
    assert nothing_hooked(host)


@pytest.mark.parametrize("kind", ["LoHa", "full"])
def test_lycoris_files_with_time_embedding_and_outer_convs_sample_as_the_hosts(host, tiny_checkpoint, kind):
    """LyCORIS LoHa / full diff on every layer type, the time embedding and conv_in / conv_out
    included, at a size whose upsamplers the host crops (64x72)."""
    model = sd1.load_checkpoint(tiny_checkpoint)
    (layouts.loha if kind == "LoHa" else layouts.full)(model, few=True).save(lora_dir(), "y")
    ours = run(host, whole(loras=[{"name": "y"}]), width=64, height=72)
    hosts = run(host, whole(), f"{PROMPT} <lora:y:1>", width=64, height=72)
    assert relative(latents(hosts), latents(run(host, whole(), width=64, height=72))) > 1e-2
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert nothing_hooked(host)


def test_weight_zero_is_bit_identical_to_no_lora_and_tags_equal_listed_loras(host, locon):
    from modules import infotext_utils

    none = run(host, whole())
    zero = run(host, whole(loras=[{"name": locon, "weight": 0}]))
    assert torch.equal(latents(zero), latents(none))
    listed = run(host, whole(loras=[{"name": locon, "weight": 0.6}]))
    tagged = run(host, whole(f"{PROMPT} <lora:{locon}:0.6>"))
    assert torch.equal(latents(listed), latents(tagged))
    assert relative(latents(listed), latents(none)) > 1e-3
    params = infotext_utils.parse_generation_parameters(tagged.info)
    assert params["Mix-of-Show region LoRAs"] == "region 0: x 0.6"
    again = run(host, params["Mix-of-Show regions"])  # pasted back
    assert torch.equal(latents(again), latents(tagged))
    assert nothing_hooked(host)


def test_two_regions_each_change_only_their_own_side(host, locon, tiny_checkpoint):
    """Region 0 (left) with x, region 1 (right) without: against the same regions without LoRAs,
    the change is larger on the left; swapping the LoRA to region 1 moves it right. (Self-attention
    carries some of it across the image, so the other side changes too: the module-level tests
    check placement exactly.)"""
    def spec(left: list, right: list) -> str:
        return json.dumps({"regions": [
            {"prompt": "a red dog", "box": [0, 0, 1, 0.5], "units": "fraction", "loras": left},
            {"prompt": "a green bird", "box": [0, 0.5, 1, 1], "units": "fraction", "loras": right}]})

    base = latents(run(host, spec([], []), steps=2, width=128, height=64))
    on_left = latents(run(host, spec([{"name": locon}], []), steps=2, width=128, height=64))
    on_right = latents(run(host, spec([], [{"name": locon}]), steps=2, width=128, height=64))
    for moved, side in ((on_left, 0), (on_right, 1)):
        change = (moved - base).abs().mean((0, 1, 2))  # per latent column
        halves = change[:8].mean(), change[8:].mean()
        assert halves[side] > 1.3 * halves[1 - side]


def test_a_concept_token_in_a_region_brings_its_lora_unless_it_is_global(host, tiny_checkpoint):
    from modules import infotext_utils

    model = sd1.load_checkpoint(tiny_checkpoint)
    write_concept(synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4, name="cat"), lora_dir() / "cat.safetensors")
    prompt = "<cat1> <cat2> sitting"
    by_token = run(host, whole(prompt))
    listed = run(host, whole(prompt, loras=[{"name": "cat"}]))
    assert torch.equal(latents(by_token), latents(listed))
    assert infotext_utils.parse_generation_parameters(by_token.info)["Mix-of-Show region LoRAs"] == \
        "region 0: cat 1 (token <cat1>)"
    global_lora = run(host, whole(prompt), f"{PROMPT} <lora:cat:1>")
    assert "Mix-of-Show region LoRAs" not in infotext_utils.parse_generation_parameters(global_lora.info)
    assert relative(latents(global_lora), latents(by_token)) < 1e-5  # applied once, by the host
    with pytest.raises(RegionError, match="'cat' is already applied to the whole image"):
        run(host, whole(prompt, loras=[{"name": "cat"}]), f"{PROMPT} <lora:cat:1>")


@pytest.mark.parametrize(("region", "error", "message"), [
    ({"loras": [{"name": "nobody"}]}, RegionError, r"region 0: field 'loras': no LoRA named 'nobody'"),
    ({"loras": [{"name": "x", "weight": "strong"}]}, RegionError, r"weight of LoRA 'x' must be a number"),
    ({"prompt": "a cat <lora:x:strong>"}, RegionError, r"<lora:x:strong>: the weight 'strong' is not a number"),
    ({"loras": [{"name": "xl"}]}, ConceptError, r"xl\.safetensors.*SDXL"),
    ({"loras": [{"name": "sd2"}]}, ConceptError, r"sd2\.safetensors.*SD2"),
])
def test_bad_region_loras_fail_before_sampling_with_nothing_hooked(host, locon, tiny_checkpoint, monkeypatch,
                                                                    region, error, message):
    from modules import script_callbacks

    model = sd1.load_checkpoint(tiny_checkpoint)
    xl = layouts.kohya_lora(model, few=True)
    xl.metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    xl.save(lora_dir(), "xl")
    sd2 = layouts.kohya_lora(model, few=True)
    sd2.metadata["ss_v2"] = "True"
    sd2.save(lora_dir(), "sd2")
    steps: list[int] = []
    script_callbacks.on_cfg_denoiser(lambda params: steps.append(params.sampling_step))
    spec = json.dumps({"regions": [{"prompt": "a cat", "box": [0, 0, 1, 1], "units": "fraction", **region}]})
    with pytest.raises(error, match=message):
        run(host, spec, steps=2)
    assert not steps and nothing_hooked(host)


def test_the_global_prompt_weight_inside_regions(host):
    """At 0 (the default) a region covering the image replaces the main prompt and negative; at 0.5
    half of the global attention is kept there; at 1 the region has no effect."""
    spec = whole("two friends", "dark")
    short, longer = run(host, spec, "two friends"), run(host, spec, "two friends in a park")
    assert torch.equal(latents(short), latents(longer))
    half = json.loads(spec) | {"global_weight": 0.5}
    short, longer = run(host, json.dumps(half), "two friends"), run(host, json.dumps(half), "two friends in a park")
    assert relative(latents(short), latents(longer)) > 1e-3
    per_region = json.loads(spec)
    per_region["regions"][0]["global_weight"] = 0.5
    assert torch.equal(latents(run(host, json.dumps(per_region), "two friends")), latents(short))
    full = json.loads(spec) | {"global_weight": 1}
    no_regions = run(host, "", "two friends in a park")
    assert relative(latents(run(host, json.dumps(full), "two friends in a park")), latents(no_regions)) < 1e-5


@pytest.mark.parametrize("shape", ["box", "painted"])
@pytest.mark.parametrize("hires", [False, True], ids=["first pass", "hires pass"])
def test_a_region_lora_changes_its_own_area_most(host, locon, shape, hires):
    """The same region with and without its LoRA: the change is largest inside the drawn box or
    painted area, not in its mirror images or transposed, for both passes of hires fix (masks at the
    second pass' size)."""
    from test_region_placement import HEIGHT, SPECS, WIDTH, area_means, change_map

    fields = dict(width=WIDTH, height=HEIGHT, steps=4, seed=3)
    if hires:
        fields.update(enable_hr=True, hr_scale=1.5, denoising_strength=0.7)
    spec = json.loads(json.dumps(SPECS[shape]))
    without = run(host, json.dumps(spec), "a photo of a dark forest", "", **fields)
    spec["regions"][0]["loras"] = [{"name": locon, "weight": 1}]
    with_lora = run(host, json.dumps(spec), "a photo of a dark forest", "", **fields)
    means = area_means(change_map(with_lora, without))
    print(shape, "hires" if hires else "first pass", {k: round(v, 4) for k, v in means.items()})
    for area in ("mirrored left-right", "mirrored top-bottom", "outside"):
        assert means["inside"] > 2.5 * means[area], (area, means)
    assert means["inside"] > 1.3 * means["transposed"], means  # it borders the box: self-attention spreads there


@pytest.mark.parametrize("mode", list(MODES))
def test_region_passes_for_a_whole_image_region_sample_as_the_hosts_own_lora(host, locon, mode):
    """`passes`: one UNet pass per region with LoRAs. Two regions that each cover the image with the
    same prompt and LoRA, its UNet layers at their full weight in the passes (`pass_unet_weight` 1),
    make two passes that each predict what the host's `<lora:x:1>` predicts, blended half and half:
    the same sampling, in every batching mode, if each host call gives every pass the same rows. At
    the default UNet share the passes draw less of the LoRA than the host's own."""
    prompt, common = batching_mode(mode)
    spec = json.loads(whole(prompt, loras=[{"name": locon, "weight": 1}])) | {"passes": True}
    spec["regions"] *= 2
    ours = run(host, json.dumps(spec | {"pass_unet_weight": 1}), prompt, **common)
    hosts = run(host, whole(prompt), f"{prompt} <lora:{locon}:1>", **common)
    assert relative(latents(ours), latents(hosts)) < 1e-5
    default = run(host, json.dumps(spec), prompt, **common)
    assert relative(latents(default), latents(hosts)) > 1e-3
    assert nothing_hooked(host)


def test_with_region_passes_a_regions_lora_cannot_reach_the_other_region(host, locon, tiny_checkpoint):
    """Two regions, x on the left, y on the right at weight 1 or 0.5: after one step the left half
    is bit-identical whatever y's weight (its prediction is the left pass's alone), while one pass
    lets the change through; the spec with `passes` is saved in the infotext and pasted back."""
    from modules import infotext_utils

    model = sd1.load_checkpoint(tiny_checkpoint)
    layouts.kohya_lora(model, dtype=torch.float32, seed=8).save(lora_dir(), "y")

    def spec(weight: float, passes: bool) -> str:
        return json.dumps({"regions": [
            {"prompt": "a red dog", "box": [0, 0, 1, 0.5], "units": "fraction", "loras": [{"name": locon}]},
            {"prompt": "a green bird", "box": [0, 0.5, 1, 1], "units": "fraction",
             "loras": [{"name": "y", "weight": weight}]}], "passes": passes})

    fields = dict(steps=1, width=128, height=64, batch_size=2)
    out = {(w, p): run(host, spec(w, p), **fields) for w in (1.0, 0.5) for p in (True, False)}
    left, right = (..., slice(0, 8)), (..., slice(8, 16))
    passes = latents(out[(1.0, True)]), latents(out[(0.5, True)])
    one = latents(out[(1.0, False)]), latents(out[(0.5, False)])
    assert torch.equal(passes[0][left], passes[1][left])
    assert relative(passes[0][right], passes[1][right]) > 1e-3
    assert relative(one[0][left], one[1][left]) > 1e-5  # what passes remove
    assert relative(passes[0], one[0]) > 1e-4  # the passes are not the one pass
    params = infotext_utils.parse_generation_parameters(out[(1.0, True)].info)
    assert json.loads(params["Mix-of-Show regions"])["passes"] is True
    again = run(host, params["Mix-of-Show regions"], **fields)
    assert torch.equal(latents(again), passes[0])
    full = run(host, json.dumps(json.loads(spec(1.0, True)) | {"pass_unet_weight": 1}), **fields)
    saved = infotext_utils.parse_generation_parameters(full.info)["Mix-of-Show regions"]
    assert json.loads(saved)["pass_unet_weight"] == 1  # the UNet share is saved and pasted back too
    assert relative(latents(full), passes[0]) > 1e-4 and torch.equal(latents(run(host, saved, **fields)), latents(full))
    assert nothing_hooked(host)


def test_the_global_prompts_share_in_a_lora_region_samples_as_the_hosts_own_lora(host, tiny_checkpoint):
    """A region over the whole image with the main prompt and a UNet LoRA, keeping half of the
    global prompt: both halves are the same prompt read through the same LoRA, so it samples what
    the host's `<lora:u:1>` samples (the global half through the base layers would not)."""
    model = sd1.load_checkpoint(tiny_checkpoint)
    lora = layouts.kohya_lora(model, dtype=torch.float32, seed=9)
    layouts.LoraFile({k: v for k, v in lora.tensors.items() if k.startswith("lora_unet_")},
                     lora.metadata).save(lora_dir(), "u")
    half = json.loads(whole(loras=[{"name": "u"}])) | {"global_weight": 0.5}
    ours = run(host, json.dumps(half), width=64, height=72)
    hosts = run(host, whole(), f"{PROMPT} <lora:u:1>", width=64, height=72)
    assert relative(latents(hosts), latents(run(host, whole(), width=64, height=72))) > 1e-2
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert nothing_hooked(host)
