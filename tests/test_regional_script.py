"""The Mix-of-Show txt2img script inside the host double: rows map correctly in every batching
mode, hooks and weights are restored after success, error and interrupt, infotext and the API
carry the regions, bad specs give clear errors, concept tokens bind in the main prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lib_mos.concepts import binding, synthetic
from lib_mos.concepts.concept import ConceptError
from lib_mos.concepts.files import write_concept
from lib_mos.models import sampling, sd1
from lib_mos.models.family import attn2_modules
from lib_mos.regional.regions import MAX_REGIONS, RegionError

WITH_EXTENSION = True  # the `host` fixture installs this extension
LONG = ", ".join(["a very detailed photo of a red cat"] * 12)
WHOLE = json.dumps({"regions": [{"prompt": "a red dog", "negative": "dark", "box": [0, 0, 1, 1],
                                 "units": "fraction"}]})


def latents(res) -> torch.Tensor:
    return torch.stack([im.latent for im in res.images])


def no_hooks(host) -> bool:
    return all("forward" not in m.__dict__ for _, m in attn2_modules(host.model.model.diffusion_model))


MODES = {
    "one call": ({}, {}),
    "batch_cond_uncond off": ({"batch_cond_uncond": False}, {}),
    "cond longer than uncond": ({}, {"long": True}),
    "longer, batch_cond_uncond off": ({"batch_cond_uncond": False}, {"long": True}),
    "pad_cond_uncond": ({"pad_cond_uncond": True}, {"long": True}),
    "NGMS": ({}, {"s_min_uncond": 1000.0}),
    "skip early CFG": ({"skip_early_cond": 0.5}, {}),
    "hires fix": ({}, {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_whole_image_region_equals_its_prompt_alone_in_every_batching_mode(host, mode):
    """If a row got the wrong region context (a negative on a cond row, a region on the wrong
    pass), the result would differ from generating with the region's prompt and negative."""
    from modules import shared

    options, fields = MODES[mode]
    fields = dict(fields)
    long = fields.pop("long", False)
    for k, v in options.items():
        setattr(shared.opts, k, v)
    common = dict(batch_size=2, steps=4, seed=5, width=64, height=72, **fields)
    regional = host.txt2img(LONG if long else "a photo of a cat", "blurry",
                            script_args=host.script_args("Mix-of-Show", WHOLE), **common)
    if fields.get("enable_hr"):
        common["hr_prompt"], common["hr_negative_prompt"] = "a red dog", "dark"
    alone = host.txt2img("a red dog", "dark", **common)
    torch.testing.assert_close(latents(regional), latents(alone), rtol=2e-3, atol=2e-3)
    assert no_hooks(host)


def test_regions_change_only_what_they_cover_and_infotext_round_trips(host):
    from modules import infotext_utils

    spec = json.dumps({"regions": [{"prompt": "a red dog", "box": [0, 0, 72, 32]},
                                   {"prompt": "a green bird", "negative": "dark", "box": [0, 32, 72, 64]}]})
    res = host.txt2img("a photo of a cat", "blurry", script_args=host.script_args("Mix-of-Show", spec), steps=3,
                       width=64, height=72)
    plain = host.txt2img("a photo of a cat", "blurry", steps=3, width=64, height=72)
    assert not torch.allclose(latents(res), latents(plain))
    params = infotext_utils.parse_generation_parameters(res.info)
    assert params["Script"] == "Mix-of-Show"
    again = host.txt2img("a photo of a cat", "blurry", steps=3, width=64, height=72,
                         script_args=host.script_args("Mix-of-Show", params["Mix-of-Show regions"]))
    assert torch.equal(latents(again), latents(res))


def test_api_takes_the_same_json(host):
    res_ui = host.txt2img("a photo of a cat", "blurry", script_args=host.script_args("Mix-of-Show", WHOLE), steps=2)
    res_api = host.txt2img("a photo of a cat", "blurry", script_args=host.script_args("Mix-of-Show", WHOLE), steps=2,
                           is_api=True)
    assert torch.equal(latents(res_ui), latents(res_api))


def test_hooks_and_weights_restored_after_error_and_interrupt(host, monkeypatch):
    from modules import script_callbacks, shared

    before = {k: v.clone() for k, v in host.model.state_dict().items()}
    module = next(d.module for d in __import__("modules").scripts.scripts_data if d.script_class.__name__ ==
                  "MixOfShowScript")

    def broken(self, params):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(module.mos_job.GenerationJob, "_plan", broken)
    with pytest.raises(RuntimeError, match="planning failed"):
        host.txt2img("a cat", script_args=host.script_args("Mix-of-Show", WHOLE), steps=2)
    assert no_hooks(host)
    monkeypatch.undo()

    script_callbacks.on_cfg_denoiser(lambda p: setattr(shared.state, "interrupted", p.denoiser.step >= 1))
    res = host.txt2img("a cat", script_args=host.script_args("Mix-of-Show", WHOLE), steps=4)
    assert res.images and no_hooks(host)
    after = host.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("spec", "error", "message"), [
    ({"regions": [{"prompt": "x", "box": [0, 0, 4, 64]}]}, RegionError, "region 0"),  # thinner than a latent cell
    ({"regions": [{"prompt": "x", "box": [0, 0, 80, 64]}]}, RegionError, "region 0"),  # outside the 64x72 image
    ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "units": "fraction"}] * (MAX_REGIONS + 1)}, RegionError,
     str(MAX_REGIONS)),
    ({"regions": [{"prompt": "a photo of <nobody1>", "box": [0, 0, 1, 1], "units": "fraction"}]}, ConceptError,
     "<nobody1>"),
    ({"regions": [{"prompt": "x", "box": [0, 0, 1, 1], "units": "fraction", "colour": "#ff0000"}]}, RegionError,
     "colour"),
])
def test_bad_specs_are_clear_errors(host, spec, error, message):
    with pytest.raises(error, match=message):
        host.txt2img("a cat", script_args=host.script_args("Mix-of-Show", json.dumps(spec)), steps=1, width=64,
                     height=72)
    assert no_hooks(host)


def test_concept_tokens_bind_in_the_main_prompt_without_regions(host, tiny_checkpoint):
    from modules import shared

    model = sd1.load_checkpoint(tiny_checkpoint)
    concept = synthetic.random_concept(model, ("<cat1>", "<cat2>"), seed=4)
    write_concept(concept, Path(shared.cmd_opts.lora_dir) / "cat.safetensors")
    prompt = "a photo of <cat1> <cat2>"
    res = host.txt2img(prompt, "blurry", script_args=host.script_args("Mix-of-Show", ""), steps=3, seed=9)
    binder = binding.PromptBinder(model, [concept])
    ours = sampling.sample_euler(model, binder.encode([prompt]), binding.encode_prompts(model, ["blurry"]),
                                 seeds=[9], height=64, width=64, steps=3, cfg_scale=7.0)
    torch.testing.assert_close(latents(res), ours, rtol=2e-3, atol=2e-3)
    with pytest.raises(ConceptError, match="<dog1>"):
        host.txt2img("a <dog1>", script_args=host.script_args("Mix-of-Show", ""), steps=1)
