"""The Mix-of-Show script on an SDXL checkpoint in the host double (sgm attention, two text
encoders, dict conditioning): regions map to the right rows in every batching mode, a whole-image
region with a LoRA samples what the host's own Lora samples, the wrong family's LoRA is refused
before sampling, and nothing stays hooked or changed."""

from __future__ import annotations

import json
from pathlib import Path

import lora_layouts as layouts
import pytest
import torch
from test_region_loras_in_host import latents, relative
from test_regional_script import LONG, MODES

from lib_mos.models import sd1, sdxl
from lib_mos.models.family import SDXL, attn2_modules

WITH_EXTENSION = True
PROMPT, NEGATIVE = "a photo of a cat", "blurry"
WHOLE_BOX = {"box": [0, 0, 1, 1], "units": "fraction"}


def whole(prompt: str = PROMPT, negative: str = NEGATIVE, **region) -> str:
    return json.dumps({"regions": [{"prompt": prompt, "negative": negative, **WHOLE_BOX, **region}]})


def lora_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.lora_dir)


def untouched(host) -> bool:
    """No hook, no instance forward, on the UNet and both text encoders."""
    model = host.model
    modules = [*model.model.diffusion_model.modules(), *model.conditioner.modules()]
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in modules)


def run(host, spec: str, prompt: str = PROMPT, negative: str = NEGATIVE, **fields):
    fields.setdefault("steps", 2)
    fields.setdefault("seed", 5)
    return host.txt2img(prompt, negative, script_args=host.script_args("Mix-of-Show", spec), **fields)


def set_mode(mode: str) -> tuple[dict, bool]:
    from modules import shared

    options, fields = MODES[mode]
    fields = dict(fields)
    long = fields.pop("long", False)
    for k, v in options.items():
        setattr(shared.opts, k, v)
    return fields, long


@pytest.fixture(scope="module")
def xl_model(tiny_sdxl_checkpoint) -> sdxl.SDXLModel:
    return sdxl.load_checkpoint(tiny_sdxl_checkpoint)


@pytest.mark.parametrize("mode", list(MODES))
def test_whole_image_region_sets_the_context_and_the_vector_stays_the_main_prompts(host_xl, mode):
    """A whole-image region "a red dog" / "dark" under the main prompt and negative samples as the
    host does when, at every step, its cond rows' cross-attention context is replaced by its own
    encoding of "a red dog" and its uncond rows' by "dark", the pooled/size vectors left as the
    main prompt's and negative's. A negative on a cond row, a region on the wrong pass, or the
    region's vector instead of the main one would not match."""
    from modules import prompt_parser, script_callbacks, shared

    fields, long = set_mode(mode)
    prompt = LONG if long else PROMPT
    common = dict(batch_size=2, width=64, height=96, **fields)
    regional = run(host_xl, whole("a red dog", "dark"), prompt, NEGATIVE, **common)
    region, negative = (shared.sd_model.get_learned_conditioning([text])["crossattn"] for text in ("a red dog", "dark"))
    swap = {"on": True}

    def with_region_context(params) -> None:
        if not swap["on"]:
            return
        for field, context in (("text_cond", region), ("text_uncond", negative)):
            cond = getattr(params, field)
            rows = cond["crossattn"].shape[0]
            setattr(params, field, prompt_parser.DictWithShape(
                {"crossattn": context.expand(rows, -1, -1), "vector": cond["vector"]}))

    script_callbacks.on_cfg_denoiser(with_region_context)
    try:
        alone = run(host_xl, json.dumps({"regions": []}), prompt, NEGATIVE, **common)
    finally:
        swap["on"] = False
    assert relative(latents(regional), latents(alone)) < 1e-5
    if mode == "one call":  # that the region acts at all, once
        plain = run(host_xl, json.dumps({"regions": []}), prompt, NEGATIVE, **common)
        assert relative(latents(regional), latents(plain)) > 1e-2
    assert untouched(host_xl)


@pytest.mark.parametrize("mode", list(MODES))
def test_whole_image_region_lora_samples_as_the_hosts_own_lora(host_xl, xl_model, mode):
    """A kohya LoCon on the UNet (every layer type) and both text encoders (bigG changes the pooled
    vector too): once the region's (our hooks), once the host's `<lora:x:1>` in the main prompt
    (weights merged by the built-in Lora)."""
    layouts.kohya_locon(xl_model, dtype=torch.float32, seed=7).save(lora_dir(), "x")
    fields, long = set_mode(mode)
    prompt = ", ".join([PROMPT] * 12) if long else PROMPT
    common = dict(batch_size=2, width=64, height=72, **fields)
    ours = run(host_xl, whole(prompt, loras=[{"name": "x", "weight": 1}]), prompt, **common)
    hosts = run(host_xl, whole(prompt), f"{prompt} <lora:x:1>", **common)
    if mode == "one call":  # that the LoRA matters, once
        plain = run(host_xl, whole(prompt), prompt, **common)
        assert relative(latents(hosts), latents(plain)) > 1e-2
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert untouched(host_xl)


@pytest.mark.parametrize("mode", ["one call", "batch_cond_uncond off", "NGMS", "hires fix"])
def test_region_passes_with_a_pooled_vector_change_sample_as_the_hosts_own_lora(host_xl, xl_model, mode):
    """`passes` on SDXL: two regions covering the image with the same prompt and LoCon (bigG changes
    the pooled vector), its UNet layers at their full weight in the passes, make two passes, each the host's `<lora:x:1>` prediction with its own vector
    change, blended half and half."""
    layouts.kohya_locon(xl_model, dtype=torch.float32, seed=7).save(lora_dir(), "x")
    fields, _ = set_mode(mode)
    common = dict(batch_size=2, width=64, height=72, **fields)
    spec = json.loads(whole(loras=[{"name": "x", "weight": 1}])) | {"passes": True, "pass_unet_weight": 1}
    spec["regions"] *= 2
    ours = run(host_xl, json.dumps(spec), **common)
    hosts = run(host_xl, whole(), f"{PROMPT} <lora:x:1>", **common)
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert untouched(host_xl)


def test_an_empty_region_negative_is_the_hosts_empty_negative(host_xl, xl_model):
    """SDXL's host encodes an all-empty negative prompt as zeros (pooled vector included); an empty
    region negative must be the same zeros, not the encoding of "", LoRA or not."""
    layouts.kohya_locon(xl_model, dtype=torch.float32, seed=7).save(lora_dir(), "x")
    common = dict(width=64, height=72)
    ours = run(host_xl, whole(negative="", loras=[{"name": "x"}]), PROMPT, "", **common)
    hosts = run(host_xl, json.dumps({"regions": []}), f"{PROMPT} <lora:x:1>", "", **common)
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert untouched(host_xl)


def test_each_rows_vector_change_is_its_own_prompts_with_the_regions_lora(host_xl, xl_model, monkeypatch):
    """With AND in the main prompt each cond row is one part: the change a region LoRA gives each
    row's vector (its pooled bigG part) is that part's, then each negative's, as the host's
    vectors with and without `<lora:x:1>` differ; the region without the LoRA gets none."""
    from lib_mos.regional.attention import SteppedRegionalContext
    from modules import script_callbacks

    layouts.kohya_locon(xl_model, dtype=torch.float32, seed=7).save(lora_dir(), "x")
    prompt, negatives = "a red dog AND a green bird", ["blurry", "dark"]
    spec = {"regions": [{"prompt": "a dog", "box": [0, 0, 1, 0.5], "units": "fraction"},
                        {"prompt": "a bird", "box": [0, 0.5, 1, 1], "units": "fraction", "loras": [{"name": "x"}]}]}
    seen: list[torch.Tensor] = []
    set_step = SteppedRegionalContext.set_step

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("vectors", args[5] if len(args) > 5 else None))
        return set_step(self, *args, **kwargs)

    monkeypatch.setattr(SteppedRegionalContext, "set_step", spy)
    common = dict(width=64, height=72, batch_size=2)
    run(host_xl, json.dumps(spec), [prompt] * 2, negatives, **common)
    host_vectors: list[torch.Tensor] = []
    script_callbacks.on_cfg_denoiser(lambda params: host_vectors.append(
        torch.cat([params.text_cond["vector"], params.text_uncond["vector"]])))
    run(host_xl, json.dumps({"regions": []}), [prompt] * 2, negatives, **common)
    run(host_xl, json.dumps({"regions": []}), [f"{prompt} <lora:x:1>"] * 2, negatives, **common)
    want = host_vectors[-1] - host_vectors[0]  # rows: 2 images x 2 parts, then 2 negatives
    pooled = xl_model.config.te2_width
    assert want.shape[0] == 6 and want[:, :pooled].abs().amax(1).gt(1e-3).all()
    assert torch.equal(want[:, pooled:], torch.zeros_like(want[:, pooled:]))  # the size part stays
    got = seen[0]
    assert got.shape == (6, 2, want.shape[1])
    assert torch.equal(got[:, 0], torch.zeros_like(got[:, 0]))
    assert relative(got[:, 1], want) < 1e-5
    assert untouched(host_xl)


@pytest.mark.parametrize("kind", ["LoHa", "full", "LoKr", "DoRA"])
def test_every_kind_with_both_text_encoders_in_a_region(host_xl, xl_model, kind):
    """LyCORIS files over every layer type, CLIP-L and bigG (te2's fused attention) included: the
    region's context is its prompt encoded with the LoRA, as the host's Lora encodes it (checked
    on the encoder itself), its pooled vector the main prompt encoded with the LoRA, and the sampled
    image equals the host's Lora."""
    from modules import script_callbacks, scripts

    build = {"LoHa": layouts.loha, "full": layouts.full, "LoKr": layouts.lokr, "DoRA": layouts.dora}[kind]
    build(xl_model, few=True).save(lora_dir(), "y")
    module = next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "MixOfShowScript")
    encodings: dict[tuple[str, ...], torch.Tensor] = {}
    original = module.mos_job.GenerationJob.encode_regions

    def spy(self, texts, *args):
        encodings[tuple(texts)] = out = original(self, texts, *args)
        return out

    module.mos_job.GenerationJob.encode_regions = spy
    try:
        ours = run(host_xl, whole(loras=[{"name": "y"}]), width=64, height=72)
    finally:
        module.mos_job.GenerationJob.encode_regions = original
    host_conds = []
    script_callbacks.on_cfg_denoiser(lambda params: host_conds.append(params.text_cond["crossattn"].clone()))
    hosts = run(host_xl, json.dumps({"regions": []}), f"{PROMPT} <lora:y:1>", width=64, height=72)
    # the region's context is the host's own encoding of that prompt with the LoRA merged
    assert relative(encodings[(PROMPT,)][0, 0], host_conds[0][0]) < 1e-5
    plain = run(host_xl, json.dumps({"regions": []}), width=64, height=72)
    assert relative(latents(hosts), latents(plain)) > 1e-2
    assert relative(latents(ours), latents(hosts)) < 1e-5
    assert untouched(host_xl)


def test_weight_zero_is_bit_identical_and_weights_come_back(host_xl, xl_model):
    layouts.kohya_lora(xl_model, dtype=torch.float32, seed=3).save(lora_dir(), "z")
    model = host_xl.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    none = run(host_xl, whole())
    zero = run(host_xl, whole(loras=[{"name": "z", "weight": 0}]))
    assert torch.equal(latents(zero), latents(none))
    run(host_xl, whole(loras=[{"name": "z", "weight": 0.8}]))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert untouched(host_xl)


def test_two_regions_use_sgm_attention_and_change_their_own_side(host_xl, xl_model):
    assert all(type(m).__module__.startswith("sgm.") for _, m in attn2_modules(host_xl.model.model.diffusion_model, SDXL))
    layouts.kohya_locon(xl_model, dtype=torch.float32, seed=9).save(lora_dir(), "left")
    spec = {"regions": [{"prompt": "a red dog", "box": [0, 0, 1, 0.5], "units": "fraction"},
                        {"prompt": "a green bird", "box": [0, 0.5, 1, 1], "units": "fraction"}]}
    base = latents(run(host_xl, json.dumps(spec), width=96, height=64))
    spec["regions"][0]["loras"] = [{"name": "left"}]
    res = run(host_xl, json.dumps(spec), width=96, height=64)
    change = (latents(res) - base).abs().mean(dim=(0, 1, 2))  # per latent column
    # the other side changes too, through self-attention and convolutions (the random tiny model
    # spreads a lot in 3 steps), but less
    assert change[:6].mean() > 1.3 * change[6:].mean()
    info = res.infotexts[0]
    assert "Mix-of-Show region LoRAs: " in info and "left" in info


def test_a_lora_for_another_family_is_refused_before_sampling(host_xl, tiny_checkpoint):
    layouts.kohya_lora(sd1.load_checkpoint(tiny_checkpoint), seed=4).save(lora_dir(), "old")
    with pytest.raises(Exception, match=r"old\.safetensors.*this is an SDXL model"):
        run(host_xl, whole(loras=[{"name": "old"}]))
    assert untouched(host_xl)
    sd2 = layouts.kohya_lora(sd1.load_checkpoint(tiny_checkpoint), seed=4)
    sd2.metadata["ss_v2"] = "True"
    sd2.save(lora_dir(), "sd2")
    with pytest.raises(Exception, match=r"sd2\.safetensors.*SD2\.x; this is an SDXL model"):
        run(host_xl, whole(loras=[{"name": "sd2"}]))


def test_the_lora_route_lists_the_loaded_familys_files(host_xl, xl_model, tiny_checkpoint):
    from modules import scripts

    mos_generation = next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "MixOfShowScript")
    layouts.kohya_lora(xl_model, few=True).save(lora_dir(), "xl-one")
    layouts.kohya_lora(sd1.load_checkpoint(tiny_checkpoint), few=True).save(lora_dir(), "sd1-one")
    listing = mos_generation.lora_list()
    assert listing["family"] == "sdxl" and [e["name"] for e in listing["loras"]] == ["xl-one"]


def test_concept_tokens_bind_on_sdxl_as_the_library_binds_them(host_xl, xl_model):
    """An SDXL concept file in the Lora folder, its tokens in the prompt and the negative, no
    script: each row's CLIP-L and bigG parts go to the host's two encoders as its SDXL embeddings
    do, and the vector input is the mean of the layer copies' pooled text at the generation's
    size. The picture is the library's own binding (`PromptBinder.conditioning`) and Euler run."""
    from lib_mos.concepts import binding, synthetic
    from lib_mos.concepts.files import write_concept
    from lib_mos.models import sampling

    concept = synthetic.random_concept(xl_model, ("<dog1>", "<dog2>"), seed=4, name="dog")
    write_concept(concept, lora_dir() / "dog.safetensors")
    prompt, negative = "a photo of <dog1> <dog2>", "blurry <dog2>"
    res = host_xl.txt2img(prompt, negative, steps=3, seed=9, width=64, height=48)
    binder = binding.PromptBinder(xl_model, [concept])
    want = sampling.sample_euler(xl_model, binder.conditioning([prompt], 64, 48), binder.conditioning([negative], 64, 48),
                                 seeds=[9], height=48, width=64, steps=3, cfg_scale=7.0)
    assert relative(latents(res), want) < 1e-4
    assert untouched(host_xl)


def test_an_sd1_concept_is_refused_on_sdxl_naming_it(host_xl, tiny_checkpoint):
    from lib_mos.concepts import synthetic
    from lib_mos.concepts.files import write_concept

    sd = sd1.load_checkpoint(tiny_checkpoint)
    write_concept(synthetic.random_concept(sd, ("<cat1>",), seed=4, name="cat"), lora_dir() / "cat.safetensors")
    with pytest.raises(Exception, match=r"cat\.safetensors.*SD1\.x.*SDXL"):
        run(host_xl, json.dumps({"regions": []}), "a photo of <cat1>")
    assert untouched(host_xl)


def test_concept_tokens_bind_in_an_sdxl_region_prompt(host_xl, xl_model):
    """A whole-image region "a <dog1> <dog2> on grass" / "dark": its cond rows attend to the
    region's bound context (70 layer copies), the vector input stays the main prompt's as for any
    region prompt, and the concept's LoRA comes into the region with its tokens (the infotext says
    so). Over the whole image that is the library's binding with the LoRA merged everywhere."""
    from lib_mos.concepts import binding, synthetic
    from lib_mos.concepts.concept import applied
    from lib_mos.concepts.files import write_concept
    from lib_mos.models import sampling

    concept = synthetic.random_concept(xl_model, ("<dog1>", "<dog2>"), seed=4, name="dog")
    write_concept(concept, lora_dir() / "dog.safetensors")
    res = run(host_xl, whole("a <dog1> <dog2> on grass", "dark"), steps=3, seed=9, width=64, height=48)
    assert 'region 0: dog 1 (token <dog1>)' in res.infotexts[0]
    with applied([(concept, 1.0, 1.0)], xl_model.unet, xl_model.text_root):
        binder = binding.PromptBinder(xl_model, [concept])
        cond = {"crossattn": binder.encode(["a <dog1> <dog2> on grass"]),
                "vector": binder.conditioning([PROMPT], 64, 48)["vector"]}
        uncond = {"crossattn": binder.encode(["dark"]), "vector": binder.conditioning([NEGATIVE], 64, 48)["vector"]}
        want = sampling.sample_euler(xl_model, cond, uncond, seeds=[9], height=48, width=64, steps=3, cfg_scale=7.0)
    assert relative(latents(res), want) < 1e-4
    assert untouched(host_xl)


def test_a_fused_sdxl_checkpoint_loads_and_its_tokens_generate(tmp_path, xl_model):
    """Two SDXL concepts fused into the tiny SDXL: the double loads the fused file (the host's SDXL
    layout, bigG's q/k/v in its in_proj) and a prompt with both concepts' tokens, no concept files
    in the Lora folder, samples as the library samples the fused file with the rows it carries."""
    import dataclasses

    from host_harness import HostHarness

    from lib_mos.concepts import binding, synthetic
    from lib_mos.fusion import checkpoint as fused_checkpoint
    from lib_mos.fusion import pipeline as fusion
    from lib_mos.models import sampling

    items = [fusion.FusionInput(dataclasses.replace(synthetic.random_concept(xl_model, (f"<{n}1>", f"<{n}2>"), seed=k,
                                                                             name=n), source_sha256=str(k) * 64))
             for k, n in enumerate(("cat", "hat"), start=1)]
    settings = fusion.FusionSettings(spatial_steps=1, spatial_size=64, check_steps=0)
    result = fusion.fuse(xl_model, items, settings)
    base = sdxl.save_checkpoint(xl_model, tmp_path / "base.safetensors")
    fused = fused_checkpoint.write_fused_checkpoint(
        base, result, tmp_path / "fused-xl.safetensors",
        fused_checkpoint.fused_metadata(items, settings, result, {sdxl.CONFIG_METADATA_KEY: xl_model.config.to_json()}))
    host = HostHarness(tmp_path / "root", fused, extensions=[str(Path(__file__).resolve().parents[1])])
    try:
        prompt, negative = "a photo of <cat1> <cat2> in a <hat1> <hat2>", "blurry"
        res = host.txt2img(prompt, negative, steps=3, seed=9, width=64, height=48)
        model = sdxl.load_checkpoint(fused)
        name = "1.text_model.encoder.layers.0.self_attn.k_proj"
        torch.testing.assert_close(model.text_root.get_submodule(name).weight, result.text_weights[name].half().float())
        binder = binding.PromptBinder(model, fused_checkpoint.read_fused_concepts(fused))
        want = sampling.sample_euler(model, binder.conditioning([prompt], 64, 48), binder.conditioning([negative], 64, 48),
                                     seeds=[9], height=48, width=64, steps=3, cfg_scale=7.0)
        assert "Mix-of-Show concepts: <cat1> <cat2> from the checkpoint; <hat1> <hat2> from the checkpoint" in \
            res.infotexts[0]
        assert relative(latents(res), want) < 1e-4
    finally:
        host.close()
