"""The host double follows A1111 v1.10.1: CFG row layout in every batching mode
(docs/host.md), script hook routing, callbacks, checkpoints and embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

LONG = ", ".join(["a very detailed photo of a red cat"] * 12)  # > 75 tokens: a second chunk


class RowRecorder:
    """Labels every UNet row by the prompt encoding its context equals: ("c", image, sub) / ("u", image)."""

    def __init__(self, host, conds: dict[tuple, torch.Tensor]):
        self.unet = host.model.model.diffusion_model
        self.conds = conds
        self.calls: list[list[tuple]] = []
        self.shapes: list[tuple[int, int]] = []

    def label(self, row: torch.Tensor) -> tuple:
        for key, cond in self.conds.items():
            n = cond.shape[0]
            if row.shape[0] >= n and torch.equal(row[:n], cond) and (
                    row.shape[0] == n or torch.equal(row[n:], row[n - 1:n].expand(row.shape[0] - n, -1))
                    or key[0] == "u"):
                return key
        raise AssertionError("UNet row matches no known prompt encoding")

    def __enter__(self):
        original = self.unet.forward

        def forward(x, timesteps=None, context=None, **kwargs):
            self.calls.append([self.label(row) for row in context])
            self.shapes.append(tuple(x.shape[-2:]))
            return original(x, timesteps, context=context, **kwargs)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        del self.unet.forward


def encode(host, text: str) -> torch.Tensor:
    with torch.no_grad():
        return host.model.get_learned_conditioning([text])[0]


def expected_calls(cond_rows: list[tuple], uncond_rows: list[tuple], batch_size: int, *, batch_cond_uncond: bool,
                   same_length: bool, skip_uncond: bool = False) -> list[list[tuple]]:
    """docs/host.md, written down independently of the double's code."""
    if same_length or skip_uncond:
        rows = cond_rows + ([] if skip_uncond else uncond_rows)
        if batch_cond_uncond:
            return [rows]
        return [rows[a:a + batch_size] for a in range(0, len(rows), batch_size)]
    chunk = 2 * batch_size if batch_cond_uncond else batch_size
    calls = [cond_rows[a:a + chunk] for a in range(0, len(cond_rows), chunk)]
    return [*calls, uncond_rows]


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
@pytest.mark.parametrize("long_cond", [False, True])
@pytest.mark.parametrize("use_and", [False, True])
def test_cfg_row_layout(host, batch_cond_uncond, long_cond, use_and):
    from modules import shared

    shared.opts.batch_cond_uncond = batch_cond_uncond
    prompts = ["a cat", "a dog", "a bird"]
    if long_cond:
        prompts = [p + ", " + LONG for p in prompts]
    subs = ["sunny", "rainy"] if use_and else []
    full = [" AND ".join([p, *subs]) for p in prompts]
    negatives = ["blurry", "dark", "noisy"]
    conds = {("c", i, 0): encode(host, p) for i, p in enumerate(prompts)}
    for j, s in enumerate(subs, start=1):
        conds[("c", "any", j)] = encode(host, s)
    conds.update({("u", i): encode(host, n) for i, n in enumerate(negatives)})
    cond_rows = [("c", i, j) if j == 0 else ("c", "any", j) for i in range(3) for j in range(1 + len(subs))]
    uncond_rows = [("u", i) for i in range(3)]
    # AND sub-prompts are stacked to the longest length, so a long first prompt makes all cond rows long
    same_length = not long_cond

    with RowRecorder(host, conds) as rec:
        host.txt2img(full, negatives, batch_size=3, steps=2)

    per_step = expected_calls(cond_rows, uncond_rows, 3, batch_cond_uncond=batch_cond_uncond, same_length=same_length)
    assert rec.calls == per_step * 2


def test_pad_cond_uncond_makes_one_call(host):
    from modules import shared

    shared.opts.pad_cond_uncond = True
    conds = {("c", 0, 0): encode(host, LONG), ("u", 0): encode(host, "blurry")}
    with RowRecorder(host, conds) as rec:
        host.txt2img(LONG, "blurry", steps=2)
    assert rec.calls == [[("c", 0, 0), ("u", 0)]] * 2


@pytest.mark.parametrize("mode", ["ngms", "ngms_all", "skip_early"])
def test_uncond_rows_dropped(host, mode):
    from modules import shared

    fields = {}
    if mode == "skip_early":
        shared.opts.skip_early_cond = 0.5
        skipped = [True, True, True, False]  # step / total_steps <= 0.5 for steps 0..2 of 4
    else:
        fields["s_min_uncond"] = 1000.0  # above every sigma
        shared.opts.s_min_uncond_all = mode == "ngms_all"
        skipped = [mode == "ngms_all" or step % 2 == 1 for step in range(4)]
    conds = {("c", i, 0): encode(host, p) for i, p in enumerate(["a cat", "a dog"])}
    conds.update({("u", i): encode(host, "blurry") for i in range(2)})
    with RowRecorder(host, conds) as rec:
        host.txt2img(["a cat", "a dog"], "blurry", batch_size=2, steps=4, **fields)
    # both negatives are equal, so their rows label as the first one
    for call, skip in zip(rec.calls, skipped):
        assert call == ([("c", 0, 0), ("c", 1, 0)] if skip else [("c", 0, 0), ("c", 1, 0), ("u", 0), ("u", 0)])
    assert len(rec.calls) == 4


def test_hires_pass_runs_at_upscaled_size_with_hr_conds(host):
    conds = {("c", 0, 0): encode(host, "a cat"), ("c", 1, 0): encode(host, "a cat, detailed"),
             ("u", 0): encode(host, "blurry")}
    with RowRecorder(host, conds) as rec:
        res = host.txt2img("a cat", "blurry", steps=2, width=64, height=96, enable_hr=True, hr_scale=1.5,
                           denoising_strength=0.5, hr_prompt="a cat, detailed")
    first, second = rec.shapes[:2], rec.shapes[2:]
    assert first == [(12, 8)] * 2
    assert second == [(18, 12)] * len(second) and 1 <= len(second) <= 2  # t_enc + 1 steps
    assert rec.calls[:2] == [[("c", 0, 0), ("u", 0)]] * 2
    assert all(call == [("c", 1, 0), ("u", 0)] for call in rec.calls[2:])
    assert res.images[0].size == (96, 144)


def test_generation_is_deterministic_and_seeded(host):
    a = host.txt2img("a cat", "blurry", seed=7)
    b = host.txt2img("a cat", "blurry", seed=7)
    c = host.txt2img("a cat", "blurry", seed=8)
    assert torch.equal(a.images[0].latent, b.images[0].latent)
    assert not torch.equal(a.images[0].latent, c.images[0].latent)
    assert "Seed: 7" in a.info and "Size: 64x64" in a.info


def test_prompt_changes_the_image(host):
    a = host.txt2img("a cat", seed=3)
    b = host.txt2img("a dog", seed=3)
    assert not torch.equal(a.images[0].latent, b.images[0].latent)


def test_interrupt_returns_last_latent_without_raising(host):
    from modules import script_callbacks, shared

    def stop(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(stop)
    res = host.txt2img("a cat", steps=4)
    assert len(res.images) == 1  # the host decodes what it had


def test_cfg_denoiser_params_and_step_quirk(host):
    """The host's state.sampling_step lags the denoiser's own step by one after step 0."""
    from modules import script_callbacks

    seen = []
    script_callbacks.on_cfg_denoiser(lambda p: seen.append((p.denoiser.step, p.sampling_step, p.total_sampling_steps,
                                                            tuple(p.x.shape), tuple(p.text_cond.shape))))
    host.txt2img("a cat", steps=3)
    assert [s[:3] for s in seen] == [(0, 0, 3), (1, 0, 3), (2, 1, 3)]
    assert seen[0][3] == (2, 4, 8, 8) and seen[0][4] == (1, 77, 32)


def test_callback_errors_are_reported_not_raised(host):
    from modules import script_callbacks

    def broken(params):
        raise ValueError("boom")

    script_callbacks.on_cfg_denoiser(broken)
    res = host.txt2img("a cat", steps=2)
    assert res.images and len(script_callbacks.reported_errors) == 2
    assert "boom" in script_callbacks.reported_errors[0]


def test_class_level_attention_is_replaced(host):
    from ldm.modules.attention import CrossAttention

    from modules import sd_hijack_optimizations

    assert CrossAttention.forward is sd_hijack_optimizations.scaled_dot_product_attention_forward


def test_emphasis_break_and_chunks(host):
    from modules import prompt_parser

    assert prompt_parser.parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", pytest.approx(1.573)], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", pytest.approx(1.4641)], [".", 1.1]]
    assert prompt_parser.parse_prompt_attention(r"\(literal\]") == [["(literal]", 1.0]]
    assert prompt_parser.parse_prompt_attention("(unbalanced") == [["unbalanced", 1.1]]
    assert prompt_parser.parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert encode(host, "a cat").shape == (77, 32)
    assert encode(host, "a cat BREAK a dog").shape == (154, 32)
    assert encode(host, LONG).shape == (154, 32)
    assert not torch.equal(encode(host, "a (cat:1.5)"), encode(host, "a cat"))


def test_embeddings_registered_programmatically_need_vectors_set(host):
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    vec = torch.randn(2, 32)
    plain = encode(host, "a mosconcept cat")
    e = Embedding(vec, "mosconcept")
    model_hijack.embedding_db.register_embedding(e, host.model)
    assert torch.equal(encode(host, "a mosconcept cat")[:2], plain[:2])  # vectors == 0: the host inserts nothing
    e.vectors, e.shape = 2, 32
    with_rows = encode(host, "a mosconcept cat")
    assert not torch.equal(with_rows, plain)
    assert torch.equal(with_rows[:2], plain[:2])  # causal encoder: positions before the embedding unchanged


def test_embeddings_are_reloaded_at_each_generation(host):
    from modules.sd_hijack import model_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    e = Embedding(torch.randn(1, 32), "mosconcept")
    e.vectors, e.shape = 1, 32
    model_hijack.embedding_db.register_embedding(e, host.model)
    host.txt2img("a cat", steps=1)
    assert "mosconcept" not in model_hijack.embedding_db.word_embeddings


def test_embedding_files_load_from_folder(host, tmp_path):
    import safetensors.torch

    from modules import shared
    from modules.sd_hijack import model_hijack

    safetensors.torch.save_file({"emb_params": torch.randn(3, 32)},
                                f"{shared.cmd_opts.embeddings_dir}/myemb.safetensors")
    safetensors.torch.save_file({"emb_params": torch.randn(3, 64)},
                                f"{shared.cmd_opts.embeddings_dir}/wrongsize.safetensors")
    host.txt2img("a cat", steps=1)
    assert model_hijack.embedding_db.word_embeddings["myemb"].vectors == 3
    assert "wrongsize" in model_hijack.embedding_db.skipped_embeddings


def test_cond_cache_ignores_embeddings_like_the_host(host):
    """persistent_cond_cache keys on prompts and settings only: a changed embedding is not seen."""
    from modules import processing

    host.txt2img("a cat", steps=1)
    cached = processing.StableDiffusionProcessing.cached_c[1]
    host.txt2img("a cat", steps=1)
    assert processing.StableDiffusionProcessing.cached_c[1] is cached


def test_checkpoints_are_listed_hashed_and_read(host):
    from modules import sd_models

    assert len(sd_models.checkpoints_list) == 1
    info = next(iter(sd_models.checkpoints_list.values()))
    assert info.shorthash and len(info.sha256) == 64 and info.title.endswith(f"[{info.shorthash}]")
    sd = sd_models.read_state_dict(info.filename)
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert unet_keys and "alphas_cumprod" in sd
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    live = host.model.state_dict()
    assert all(torch.equal(live[k], sd[k]) for k in unet_keys)
    assert host.model.sd_checkpoint_info is info


def test_options_refuse_unknown_names(host):
    from modules import shared

    with pytest.raises(AttributeError):
        _ = shared.opts.no_such_setting


# --- prompt editing and alternation (modules/prompt_parser.py) -----------------------------------------
def test_prompt_schedules_match_the_host_examples():
    """The examples of the host's own docstring (v1.10.1 get_learned_conditioning_prompt_schedules)."""
    from modules import prompt_parser

    def g(prompt, steps=10, hires=None, old=False):
        return prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps, hires, old)[0]

    assert g("test") == [[10, "test"]]
    assert g("a [b:3]") == [[3, "a "], [10, "a b"]]
    assert g("a [b: 3]") == [[3, "a "], [10, "a b"]]
    assert g("a [[[b]]:2]") == [[2, "a "], [10, "a [[b]]"]]
    assert g("[(a:2):3]") == [[3, ""], [10, "(a:2)"]]
    assert g("a [b : c : 1] d") == [[1, "a b  d"], [10, "a  c  d"]]
    assert g("a[b:[c:d:2]:1]e") == [[1, "abe"], [2, "ace"], [10, "ade"]]
    assert g("a [unbalanced") == [[10, "a [unbalanced"]]
    assert g("a [b:.5] c") == [[5, "a  c"], [10, "a b c"]]
    # the docstring says [[5, "a  c"], [10, "a {b|d{ c"]], but with the lark the host pins (1.1.2) its
    # code does not parse this prompt and uses it as written
    assert g("a [{b|d{:.5] c") == [[10, "a [{b|d{:.5] c"]]
    assert g("((a][:b:c [d:3]") == [[3, "((a][:b:c "], [10, "((a][:b:c d"]]
    assert g("[a|(b:1.1)]") == [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]
    assert g("[fe|]male") == [[i, "female" if i % 2 else "male"] for i in range(1, 11)]
    assert g("[fe|||]male") == [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]
    # hires pass: integers count from the end of the first pass, fractions span 1..2
    assert g("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]
    assert g("a [b:13] c", 10, 10) == [[3, "a  c"], [10, "a b c"]]
    # old timelines: below 1 a fraction, else a step; no hires offsets
    assert g("a [b:1.0] c", 10, None, True) == [[1, "a  c"], [10, "a b c"]]
    assert g("a [b:1.0] c", 10) == [[10, "a  c"]]
    assert g("a [b:13] c", 10, 10, True) == [[10, "a  c"]]


class ContextRecorder:
    """Per UNet call, which known prompt encoding each cond row is (rows first, before the uncond)."""

    def __init__(self, host, texts: list[str]):
        self.unet = host.model.model.diffusion_model
        self.known = {t: encode(host, t) for t in texts}
        self.calls: list[list[str]] = []

    def label(self, row):
        for text, cond in self.known.items():
            if row.shape == cond.shape and torch.allclose(row, cond, atol=1e-5):
                return text
        return "?"

    def __enter__(self):
        original = self.unet.forward

        def forward(x, timesteps=None, context=None, **kwargs):
            self.calls.append([self.label(row) for row in context])
            return original(x, timesteps, context=context, **kwargs)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        del self.unet.forward

    def conds(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.mark.parametrize(("prompt", "per_step"), [
    ("[a cat:a dog:2]", ["a cat", "a cat", "a cat", "a dog"]),  # step (0-based) <= 2 uses the first text
    ("[a cat:a dog:0.5]", ["a cat", "a cat", "a cat", "a dog"]),  # a fraction of 4 steps
    ("[a cat::1]", ["a cat", "a cat", "", "", ]),
    ("[a dog:3]", ["", "", "", "", ]),  # switches after step 3 of 4: never within 0..3
    ("[a cat|a dog]", ["a cat", "a cat", "a dog", "a cat"]),  # schedule ends at 1, 2, 3, 4; steps count from 0
])
def test_prompt_editing_and_alternation_switch_the_cond_per_step(host, prompt, per_step):
    with ContextRecorder(host, ["a cat", "a dog", "", "blurry"]) as rec:
        host.txt2img(prompt, "blurry", steps=4)
    assert rec.conds() == per_step
    assert all(call[1] == "blurry" for call in rec.calls)


@pytest.mark.parametrize(("prompt", "hires"), [
    ("[a cat:a dog:5]", ["a cat", "a cat", "a dog", "a dog"]),  # step 5 = hires step 1
    ("[a cat:a dog:1.5]", ["a cat", "a cat", "a cat", "a dog"]),  # half of the hires pass
])
def test_prompt_editing_in_the_hires_pass(host, prompt, hires):
    """First pass 4 steps, hires pass `hr_second_pass_steps` 4 at denoising 0.5: the host runs exactly 4
    steps (of an 8-step schedule), on a schedule whose integers continue the first pass."""
    with ContextRecorder(host, ["a cat", "a dog", "blurry"]) as rec:
        host.txt2img(prompt, "blurry", steps=4, enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                     hr_second_pass_steps=4)
    assert rec.conds() == ["a cat"] * 4 + hires


def test_old_prompt_editing_timelines(host):
    from modules import shared

    shared.opts.use_old_scheduling = True
    with ContextRecorder(host, ["a cat", "a dog", ""]) as rec:
        res = host.txt2img("[a cat:a dog:1.0]", steps=4)
    assert rec.conds() == ["a cat", "a cat", "a dog", "a dog"]  # 1.0 is step 1 on the old timelines
    assert "Old prompt editing timelines: True" in res.info
    shared.opts.use_old_scheduling = False
    with ContextRecorder(host, ["a cat", "a dog", ""]) as rec:
        res = host.txt2img("[a cat:a dog:1.0]", steps=4)
    assert rec.conds() == ["a cat"] * 4  # 1.0 is the whole of the steps on the new ones
    assert "Old prompt editing timelines" not in res.info


# --- checkpoint switch by override_settings (processing.process_images, sd_models) ---------------------
@pytest.fixture(scope="module")
def other_checkpoints(tmp_path_factory, tiny_checkpoint):
    """Another tiny SD1 with other weights (same config), and the tiny one under a config with other
    attention heads (the double's stand-in for another config yaml)."""
    import dataclasses

    import safetensors.torch

    from lib_mos.models import sd1

    folder = tmp_path_factory.mktemp("other-ckpts")
    same = sd1.save_checkpoint(sd1.build_tiny_sd1(seed=1), folder / "other.safetensors")
    tensors = safetensors.torch.load_file(str(tiny_checkpoint))
    config = dataclasses.replace(sd1.TINY_SD1, text_heads=2)
    other_config = folder / "otherconfig.safetensors"
    safetensors.torch.save_file(tensors, str(other_config), metadata={sd1.CONFIG_METADATA_KEY: config.to_json()})
    return same, other_config


def _add_checkpoint(path):
    import shutil

    from modules import sd_models

    shutil.copy(path, f"{sd_models.model_path}/{path.name}")
    sd_models.list_models()


def test_checkpoint_override_reloads_in_place_and_is_not_reloaded_back(host, other_checkpoints):
    from modules import infotext_utils, script_callbacks, sd_hijack_clip, sd_models, shared

    same_config, _ = other_checkpoints
    _add_checkpoint(same_config)
    original = shared.opts.sd_model_checkpoint
    assert original in sd_models.checkpoint_aliases  # listed again with its cached hash in the title
    loaded = []
    script_callbacks.on_model_loaded(loaded.append)
    base = host.txt2img("a cat", seed=5)
    assert loaded == []

    res = host.txt2img("a cat", seed=5, override_settings={"sd_model_checkpoint": "other"})
    assert loaded == [host.model] and shared.sd_model is host.model  # the same object took new weights
    assert infotext_utils.parse_generation_parameters(res.info)["Model"] == "other"
    assert not torch.equal(res.images[0].latent, base.images[0].latent)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(host.model.state_dict()[key], sd_models.read_state_dict(str(same_config))[key])
    assert not isinstance(host.model.cond_stage_model.wrapped, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords)
    assert shared.opts.sd_model_checkpoint == original  # the setting is restored...
    assert host.model.sd_checkpoint_info.name_for_extra == "other"  # ...the model is not

    again = host.txt2img("a cat", seed=5)  # the next run loads the settings' checkpoint
    assert len(loaded) == 2 and host.model.sd_checkpoint_info.name_for_extra == "tiny-sd1"
    assert torch.equal(again.images[0].latent, base.images[0].latent)

    host.txt2img("a cat", override_settings={"sd_model_checkpoint": "other"},
                 override_settings_restore_afterwards=False)
    assert shared.opts.sd_model_checkpoint == host.model.sd_checkpoint_info.title != original
    shared.opts.sd_model_checkpoint = original
    host.txt2img("a cat", override_settings={"sd_model_checkpoint": "no such model"})  # dropped: the settings' one
    assert host.model.sd_checkpoint_info.name_for_extra == "tiny-sd1" and len(loaded) == 4


def test_override_settings_restore_only_settings_already_in_the_config(host):
    from modules import shared

    assert "CLIP_stop_at_last_layers" not in shared.opts.data
    res = host.txt2img("a cat", override_settings={"CLIP_stop_at_last_layers": 2})
    assert "Clip skip: 2" in res.info
    assert shared.opts.CLIP_stop_at_last_layers == 2  # not in the config before: the host does not restore it
    shared.opts.CLIP_stop_at_last_layers = 1
    host.txt2img("a cat", override_settings={"CLIP_stop_at_last_layers": 2})
    assert shared.opts.CLIP_stop_at_last_layers == 1
    with pytest.raises(KeyError):
        host.txt2img("a cat", override_settings={"no_such_setting": 1})


def test_checkpoint_of_another_config_replaces_the_model(host, other_checkpoints):
    from modules import script_callbacks, shared

    _, other_config = other_checkpoints
    _add_checkpoint(other_config)
    loaded = []
    script_callbacks.on_model_loaded(loaded.append)
    old = host.model
    res = host.txt2img("a cat", override_settings={"sd_model_checkpoint": "otherconfig"})
    assert res.images and loaded == [shared.sd_model] and shared.sd_model is not old
    assert shared.sd_model.used_config.text_heads == 2
    assert old.model.diffusion_model.out[2].weight.device.type == "meta"  # the host trashes the old model


# --- img2img (processing.StableDiffusionProcessingImg2Img, modules/img2img.py) -------------------------
def test_img2img_enters_the_schedule_at_the_denoising_strength(host):
    """steps 10 at strength 0.5: t_enc 5, so 6 denoiser calls from sigma[4] of the 10-step schedule, the
    first on init_latent + noise * sigma; the init latent is the least-squares inverse of the double's
    latent->RGB decode."""
    from modules import processing, script_callbacks, sd_samplers

    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    init = processing.latent_to_pil(host.model, latent)[0]
    seen = []
    script_callbacks.on_cfg_denoiser(lambda p: seen.append((p.denoiser.step, p.total_sampling_steps, p.x.clone(),
                                                            p.sigma.clone(), p.denoiser.init_latent)))
    res = host.img2img("a cat", "blurry", init_img=init, steps=10, denoising_strength=0.5, seed=3)

    assert [(s[0], s[1]) for s in seen] == [(i, 6) for i in range(6)]
    init_latent = seen[0][4]
    decoded = np.asarray(processing.latent_to_pil(host.model, init_latent)[0], dtype=np.int16)
    assert np.abs(decoded - np.asarray(init, dtype=np.int16)).max() <= 1  # decode(encode(image)) == image
    sigmas = sd_samplers.CompVisDenoiser(host.model).get_sigmas(10)
    noise = processing.ImageRNG((4, 8, 8), [3]).next()
    assert torch.allclose(seen[0][3], sigmas[4].expand(2))
    assert torch.allclose(seen[0][2][0], (init_latent + noise * sigmas[4])[0], atol=1e-5)
    assert "Denoising strength: 0.5" in res.info and res.images[0].size == (64, 64)


IMG2IMG_EXTENSION = '''
import gradio as gr
from modules import processing, scripts

CALLS = []


class Both(scripts.Script):
    def title(self):
        return "Both tabs"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return [gr.Textbox(value="img" if is_img2img else "txt", elem_id=self.elem_id("word"))]

    def setup(self, p, word):
        CALLS.append(("setup", word, p.is_api))

    def process(self, p, word):
        CALLS.append(("process", type(p).__name__, word, self.is_img2img))

    def process_before_every_sampling(self, p, word, **kwargs):
        CALLS.append(("sampling", word, kwargs["x"] is getattr(p, "init_latent", None)))

    def postprocess(self, p, processed, word):
        CALLS.append(("postprocess", word, len(processed.images)))


class Dropdown:  # not a Script itself: the host would load it as one
    def ui(self, is_img2img):
        return [gr.Textbox(elem_id=self.elem_id("word"))]

    def run(self, p, word):
        CALLS.append(("run", self.title(), word))
        processed = processing.process_images(p)
        if word == "raise":
            raise RuntimeError("after generating")
        return processed


class TxtOnly(Dropdown, scripts.Script):
    def title(self):
        return "Txt only"

    def show(self, is_img2img):
        return not is_img2img


class ImgOnly(Dropdown, scripts.Script):
    def title(self):
        return "Img only"

    def show(self, is_img2img):
        return is_img2img
'''


@pytest.fixture
def img2img_host(tmp_path, tiny_checkpoint):
    from host_harness import HostHarness

    ext = tmp_path / "extensions" / "tabs-ext"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "tabs_script.py").write_text(IMG2IMG_EXTENSION)
    harness = HostHarness(tmp_path / "data", tiny_checkpoint, extensions=[str(ext)])
    try:
        from modules import scripts

        yield harness, scripts.scripts_data[0].module
    finally:
        harness.close()


def test_img2img_has_its_own_script_runner(img2img_host):
    from modules import scripts

    host, module = img2img_host
    txt, img = scripts.scripts_txt2img, scripts.scripts_img2img
    assert [s.title() for s in txt.selectable_scripts] == ["Txt only"]
    assert [s.title() for s in img.selectable_scripts] == ["Img only"]
    assert txt.alwayson_scripts[0] is not img.alwayson_scripts[0]
    # the host's Script.elem_id: the tab only for a script shown on both tabs (or neither)
    ids = {(tab, s.title()): s.controls[0].elem_id for tab, r in (("txt", txt), ("img", img)) for s in r.scripts}
    assert ids == {("txt", "Both tabs"): "script_txt2img_both_tabs_word", ("txt", "Txt only"): "script_txt_only_word",
                   ("img", "Both tabs"): "script_img2img_both_tabs_word", ("img", "Img only"): "script_img_only_word"}

    res = host.img2img("a cat", script_args=host.script_args("Img only", "hello", is_img2img=True))
    assert len(res.images) == 1
    assert module.CALLS == [("setup", "img", False), ("run", "Img only", "hello"),
                            ("process", "StableDiffusionProcessingImg2Img", "img", True), ("sampling", "img", True),
                            ("postprocess", "img", 1)]


def test_generation_closes_p_on_every_path(img2img_host, monkeypatch):
    """txt2img, img2img and the API path run inside `with closing(p)`, also when a script raises; the
    API path sets `is_api` before the scripts see p."""
    from modules import processing

    host, module = img2img_host
    closed = []
    original = processing.StableDiffusionProcessing.close

    def close(self):
        closed.append(type(self).__name__[len("StableDiffusionProcessing"):])
        original(self)

    monkeypatch.setattr(processing.StableDiffusionProcessing, "close", close)
    host.txt2img("a cat", steps=1)
    host.img2img("a cat", steps=1)
    host.txt2img("a cat", steps=1, is_api=True)
    host.img2img("a cat", steps=1, is_api=True)
    with pytest.raises(RuntimeError, match="after generating"):
        host.img2img("a cat", steps=1, script_args=host.script_args("Img only", "raise", is_img2img=True))
    with pytest.raises(RuntimeError, match="after generating"):
        host.txt2img("a cat", steps=1, script_args=host.script_args("Txt only", "raise"), is_api=True)
    assert closed == ["Txt2Img", "Img2Img", "Txt2Img", "Img2Img", "Img2Img", "Txt2Img"]
    setups = [c for c in module.CALLS if c[0] == "setup"]
    assert setups == [("setup", "txt", False), ("setup", "img", False), ("setup", "txt", True),
                      ("setup", "img", True), ("setup", "img", False), ("setup", "txt", True)]


# --- the built-in Lora extension (extensions-builtin/Lora) ------------------------------------------------
UNET_K = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
UNET_K_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE_Q = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
TE_Q_KOHYA = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CONV3 = "diffusion_model_input_blocks_1_0_in_layers_2"  # a resnet's conv1 (3x3)
CONV3_KOHYA = "lora_unet_down_blocks_0_resnets_0_conv1"
PROJ_IN = "diffusion_model_input_blocks_1_1_proj_in"  # 1x1 conv in SD1


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def save_lora(name: str, tensors: dict) -> str:
    import safetensors.torch

    from modules import shared

    path = f"{shared.cmd_opts.lora_dir}/{name}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def layer(host, name):
    return host.model.network_layer_mapping[name]


def weights(host, *names):
    return {n: layer(host, n).weight.detach().clone() for n in names}


def lora_factors(stem, out_f, in_f, rank, alpha, seed, kernel=()):
    down, up = rand(rank, in_f, *kernel, seed=seed), rand(out_f, rank, *([1, 1] if kernel else []), seed=seed + 1)
    return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(float(alpha))}


def test_lora_applies_the_host_math_and_restores_the_weights(host):
    """up @ down * alpha / rank * multiplier, the text-encoder multiplier on text-encoder layers and the
    UNet one elsewhere; conv factors as the host reshapes them; unknown keys ignored; a generation
    without <lora:...> restores the original weights exactly."""
    import hashlib

    from modules import errors

    tensors = {**lora_factors(UNET_K_KOHYA, 32, 32, 4, 2, seed=1),
               **lora_factors(TE_Q_KOHYA, 32, 32, 8, 4, seed=3),
               **lora_factors(CONV3_KOHYA, 32, 32, 4, 1, seed=5, kernel=(3, 3)),
               **lora_factors("lora_unet_input_blocks_1_1_proj_in", 32, 32, 2, 2, seed=7),  # ldm spelling, 2-D
               "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 2)}  # matches nothing: ignored
    path = save_lora("mylora", tensors)
    names = (UNET_K, TE_Q, CONV3, PROJ_IN)
    orig = weights(host, *names)

    def expected(te, unet):
        def delta(stem, scale, mult, shape):
            up, down = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"]
            return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape) * scale * mult

        return {UNET_K: orig[UNET_K] + delta(UNET_K_KOHYA, 2 / 4, unet, (32, 32)),
                TE_Q: orig[TE_Q] + delta(TE_Q_KOHYA, 4 / 8, te, (32, 32)),
                CONV3: orig[CONV3] + delta(CONV3_KOHYA, 1 / 4, unet, (32, 32, 3, 3)),
                PROJ_IN: orig[PROJ_IN] + delta("lora_unet_input_blocks_1_1_proj_in", 1.0, unet, (32, 32, 1, 1))}

    for tag, te, unet in (("<lora:mylora:0.5:2>", 0.5, 2.0), ("<lora:mylora:0.25>", 0.25, 0.25),
                          ("<lora:mylora:te=0.75:unet=-1>", 0.75, -1.0), ("<lyco:mylora>", 1.0, 1.0)):
        res = host.txt2img(f"a cat {tag}", steps=1)
        want = expected(te, unet)
        for n in names:
            torch.testing.assert_close(layer(host, n).weight, want[n], rtol=1e-5, atol=1e-6, msg=f"{tag} {n}")
        assert res.info.startswith(f"a cat {tag}\n")  # the infotext keeps the tag
    with open(path, "rb") as f:  # kohya's addnet hash: sha256 of what follows the safetensors header
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        addnet = hashlib.sha256(f.read()).hexdigest()
    assert f'Lora hashes: "mylora: {addnet[:12]}"' in res.info
    assert errors.reported == []

    host.txt2img("a cat", steps=1)
    for n in names:
        assert torch.equal(layer(host, n).weight, orig[n])


def test_lora_weights_change_lazily_and_only_when_the_set_changes(host):
    """Loading networks changes no weight; a layer's next forward restores its backup and applies the
    loaded set, and does nothing while the set (names, multipliers) stays the same, even when a file
    changed on disk."""
    import os

    import networks

    a = lora_factors(UNET_K_KOHYA, 32, 32, 4, 4, seed=11)
    b = lora_factors(UNET_K_KOHYA, 32, 32, 4, 4, seed=13)
    path_a = save_lora("a", a)
    save_lora("b", b)
    w = layer(host, UNET_K).weight.detach().clone()

    def delta(t, mult=1.0):
        return t[f"{UNET_K_KOHYA}.lora_up.weight"] @ t[f"{UNET_K_KOHYA}.lora_down.weight"] * mult

    host.txt2img("a cat <lora:a:1>", steps=1)
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta(a))
    host.txt2img("a cat <lora:a:1> <lora:b:0.5>", steps=1)  # from the backup, not on top of a
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta(a) + delta(b, 0.5))

    networks.load_networks([])
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta(a) + delta(b, 0.5))  # no forward yet
    layer(host, UNET_K)(torch.zeros(1, 32))
    assert torch.equal(layer(host, UNET_K).weight, w)

    host.txt2img("a cat <lora:a:1>", steps=1)
    c = lora_factors(UNET_K_KOHYA, 32, 32, 4, 4, seed=17)
    save_lora("a", c)
    os.utime(path_a, (os.path.getmtime(path_a) + 10,) * 2)
    host.txt2img("a cat <lora:a:1>", steps=1)  # the new file is loaded, but the set is unchanged...
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta(a))  # ...so the weights are not redone
    assert networks.loaded_networks[0].modules[UNET_K].up_weight.equal(c[f"{UNET_K_KOHYA}.lora_up.weight"])
    host.txt2img("a cat <lora:a:0.5>", steps=1)
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta(c, 0.5))


def test_lora_module_types(host):
    """LoHa, LoKr, full diffs (with a bias diff), CP-decomposed conv LoRA (lora_mid), PEFT's
    lora_A/lora_B names and DoRA's dora_scale, against the formulas written out here."""
    q1 = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    v1 = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_v"
    out1 = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
    fc1 = "transformer_text_model_encoder_layers_1_mlp_fc1"
    k1 = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_k"
    kohya = {q1: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             v1: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v",
             out1: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
             fc1: "lora_te_text_model_encoder_layers_1_mlp_fc1",
             k1: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
             CONV3: CONV3_KOHYA}
    hada = {"hada_w1_a": rand(32, 2, seed=1), "hada_w1_b": rand(2, 32, seed=2), "hada_w2_a": rand(32, 2, seed=3),
            "hada_w2_b": rand(2, 32, seed=4), "alpha": torch.tensor(1.0)}
    lokr = {"lokr_w1_a": rand(4, 3, seed=5), "lokr_w1_b": rand(3, 4, seed=18), "lokr_w2_a": rand(8, 2, seed=6),
            "lokr_w2_b": rand(2, 8, seed=7), "alpha": torch.tensor(4.0)}  # the rank is w2b's (2)
    full = {"diff": rand(32, 32, seed=8), "diff_b": rand(32, seed=9)}
    peft = {"lora_A.weight": rand(4, 32, seed=10), "lora_B.weight": rand(64, 4, seed=11)}
    cp = {"lora_down.weight": rand(2, 32, 1, 1, seed=12), "lora_mid.weight": rand(2, 2, 3, 3, seed=13),
          "lora_up.weight": rand(32, 2, 1, 1, seed=14), "alpha": torch.tensor(1.0)}
    dora = {"lora_down.weight": rand(4, 32, seed=15), "lora_up.weight": rand(32, 4, seed=16),
            "alpha": torch.tensor(4.0), "dora_scale": rand(1, 32, seed=17).abs() + 1}
    parts = {q1: hada, v1: lokr, out1: full, fc1: peft, CONV3: cp, k1: dora}
    save_lora("types", {f"{kohya[n]}.{k}": v for n, p in parts.items() for k, v in p.items()})
    orig = weights(host, *parts)
    orig_bias = layer(host, out1).bias.detach().clone()

    host.txt2img("a cat <lora:types:0.5:2>", steps=1)  # te 0.5, unet 2
    m = 2.0
    expected = {
        q1: orig[q1] + (hada["hada_w1_a"] @ hada["hada_w1_b"]) * (hada["hada_w2_a"] @ hada["hada_w2_b"]) * (1 / 2) * m,
        v1: orig[v1] + torch.kron(lokr["lokr_w1_a"] @ lokr["lokr_w1_b"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"])
        * (4 / 2) * m,
        out1: orig[out1] + full["diff"] * m,
        fc1: orig[fc1] + peft["lora_B.weight"] @ peft["lora_A.weight"] * 0.5,
        CONV3: orig[CONV3] + torch.einsum("nmkl,in,mj->ijkl", cp["lora_mid.weight"], cp["lora_up.weight"][:, :, 0, 0],
                                          cp["lora_down.weight"][:, :, 0, 0]) * (1 / 2) * m,
    }
    merged = orig[k1] + dora["lora_up.weight"] @ dora["lora_down.weight"] * (4 / 4)
    expected[k1] = orig[k1] + (merged * dora["dora_scale"] / merged.norm(dim=0, keepdim=True) - orig[k1]) * m
    for n, want in expected.items():
        torch.testing.assert_close(layer(host, n).weight, want, rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(layer(host, out1).bias, orig_bias + full["diff_b"] * m)


def test_lora_key_spellings_resolve_like_the_host():
    """kohya's diffusers spelling -> the ldm layer names (SD1), as networks.convert_diffusers_name_to_compvis."""
    cases = {
        "lora_unet_conv_in": "diffusion_model_input_blocks_0_0",
        "lora_unet_conv_out": "diffusion_model_out_2",
        "lora_unet_time_embedding_linear_1": "diffusion_model_time_embed_0",
        "lora_unet_time_embedding_linear_2": "diffusion_model_time_embed_2",
        "lora_unet_down_blocks_1_attentions_1_proj_in": "diffusion_model_input_blocks_5_1_proj_in",
        "lora_unet_down_blocks_0_resnets_1_conv2": "diffusion_model_input_blocks_2_0_out_layers_3",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "diffusion_model_input_blocks_1_0_emb_layers_1",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "diffusion_model_input_blocks_9_0_op",
        "lora_unet_mid_block_attentions_0_proj_out": "diffusion_model_middle_block_1_proj_out",
        "lora_unet_mid_block_resnets_1_norm1": "diffusion_model_middle_block_2_in_layers_0",
        "lora_unet_up_blocks_1_attentions_2_proj_out": "diffusion_model_output_blocks_5_1_proj_out",
        "lora_unet_up_blocks_2_resnets_1_conv_shortcut": "diffusion_model_output_blocks_7_0_skip_connection",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "diffusion_model_output_blocks_2_1_conv",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "diffusion_model_output_blocks_5_2_conv",
        "lora_te_text_model_encoder_layers_11_mlp_fc2": "transformer_text_model_encoder_layers_11_mlp_fc2",
        "lora_unet_input_blocks_1_1_proj_in": "lora_unet_input_blocks_1_1_proj_in",  # not converted
    }
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "host" / "extensions-builtin" / "Lora"))
    try:
        import networks
    finally:
        sys.path.pop(0)
    for key, name in cases.items():
        assert networks.convert_diffusers_name_to_compvis(key, False) == name, key


def test_lora_spellings_apply_alike_and_failures_are_reported(host):
    from modules import errors

    kohya = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v"
    ldm = "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_v"
    v5 = "diffusion_model_input_blocks_5_1_transformer_blocks_0_attn1_to_v"
    te1 = "transformer_text_model_encoder_layers_1_mlp_fc1"
    save_lora("kohya", {**lora_factors(kohya, 64, 64, 4, 4, seed=1),
                        **lora_factors("lora_te_text_model_encoder_layers_1_mlp_fc1", 64, 32, 4, 4, seed=3)})
    save_lora("ldm", {**lora_factors(ldm, 64, 64, 4, 4, seed=1),
                      **lora_factors("lora_te1_text_model_encoder_layers_1_mlp_fc1", 64, 32, 4, 4, seed=3)})
    orig = weights(host, v5, te1)
    host.txt2img("a cat <lora:kohya:1>", steps=1)
    via_kohya = weights(host, v5, te1)
    host.txt2img("a cat <lora:ldm:1>", steps=1)
    assert all(not torch.equal(via_kohya[n], orig[n]) and torch.equal(layer(host, n).weight, via_kohya[n])
               for n in (v5, te1))

    save_lora("norm", lora_factors("lora_unet_down_blocks_0_resnets_0_norm1", 32, 32, 2, 2, seed=5))  # GroupNorm
    save_lora("ia3", {f"{kohya}.weight": torch.ones(64), f"{kohya}.on_input": torch.tensor(False)})
    save_lora("bad", lora_factors(kohya, 64, 16, 4, 4, seed=7))  # wrong input width: fails when applied
    res = host.txt2img("a cat <lora:nosuch:1> <lora:norm:1> <lora:ia3:1> <lora:bad:1>", steps=1)
    assert "Lora not found: nosuch" in res.comments
    assert "Networks with errors: bad (1)" in res.comments
    reported = "\n".join(errors.reported)
    assert "unsupported type: GroupNorm32" in reported and "Could not find a module type" in reported
    assert torch.equal(layer(host, v5).weight, orig[v5])  # "bad" left the layer as it was


def test_lora_is_applied_again_over_weights_loaded_in_place(host, other_checkpoints):
    """Loading a checkpoint into the live model resets each layer's Lora backup (the patched
    `_load_from_state_dict`), so the same <lora:...> is applied over the new weights."""
    from modules import sd_models

    same_config, _ = other_checkpoints
    _add_checkpoint(same_config)
    a = lora_factors(UNET_K_KOHYA, 32, 32, 4, 4, seed=21)
    save_lora("a", a)
    delta = a[f"{UNET_K_KOHYA}.lora_up.weight"] @ a[f"{UNET_K_KOHYA}.lora_down.weight"]
    w = layer(host, UNET_K).weight.detach().clone()
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    other_w = sd_models.read_state_dict(str(same_config))[key]
    host.txt2img("a cat <lora:a:1>", steps=1)
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta)
    host.txt2img("a cat <lora:a:1>", steps=1, override_settings={"sd_model_checkpoint": "other"})
    torch.testing.assert_close(layer(host, UNET_K).weight, other_w + delta)
    host.txt2img("a cat", steps=1)
    assert torch.equal(layer(host, UNET_K).weight, w)


def test_lora_pt_files_are_read_through_the_pickle_guard(host):
    """A .pt Lora is read with the host's torch.load (behind its pickle guard): a legacy pickle applies;
    a zip applies unless this torch wrote entries the guard does not allow (`.format_version`,
    `.storage_alignment`, which recent torch versions write), in which case it is refused and reported."""
    import zipfile

    from modules import errors, shared

    t = lora_factors(UNET_K_KOHYA, 32, 32, 4, 4, seed=31)
    delta = t[f"{UNET_K_KOHYA}.lora_up.weight"] @ t[f"{UNET_K_KOHYA}.lora_down.weight"]
    torch.save(t, f"{shared.cmd_opts.lora_dir}/legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(t, f"{shared.cmd_opts.lora_dir}/newzip.pt")
    with zipfile.ZipFile(f"{shared.cmd_opts.lora_dir}/newzip.pt") as z:
        refused = any(n.endswith((".format_version", ".storage_alignment")) for n in z.namelist())
    w = layer(host, UNET_K).weight.detach().clone()
    host.txt2img("a cat <lora:newzip:1>", steps=1)
    if refused:
        assert torch.equal(layer(host, UNET_K).weight, w)
        assert any(e.startswith("loading network") and "newzip.pt" in e for e in errors.reported)
    else:
        torch.testing.assert_close(layer(host, UNET_K).weight, w + delta)
    host.txt2img("a cat <lora:legacy:0.5>", steps=1)
    torch.testing.assert_close(layer(host, UNET_K).weight, w + delta * 0.5)


def test_script_elem_id_like_the_host():
    from modules import scripts

    class OneTab(scripts.Script):
        def title(self):
            return "Mix-of-Show  (v2)\tX"

        def show(self, is_img2img):
            return not is_img2img

    class BothTabs(OneTab):
        def show(self, is_img2img):
            return True

    one, both = OneTab(), BothTabs()
    one.is_img2img, both.is_img2img = False, True
    assert one.elem_id("regions") == "script_mixofshow__v2_x_regions"
    assert both.elem_id("regions") == "script_img2img_mixofshow__v2_x_regions"


@pytest.fixture
def fresh_progress():
    """The host's task registry and job state as in a fresh process, and again afterwards."""
    from modules import progress, shared

    progress.reset()
    shared.state.reset()
    yield progress
    progress.reset()
    shared.state.reset()


def test_progress_api_answers_like_the_host(fresh_progress, monkeypatch):
    import re
    import time

    from modules import shared

    progress = fresh_progress
    ask = lambda task: progress.progressapi(progress.ProgressRequest(id_task=task))  # noqa: E731
    assert re.fullmatch(r"task\(merge-[A-Z0-9]{7}\)", progress.create_task_id("merge"))

    # unknown, queued (ranked by the time each was queued, not by insertion), current, finished
    res = ask("task(nobody)")
    assert (res.active, res.queued, res.completed, res.textinfo) == (False, False, False, "Waiting...")
    assert (res.progress, res.eta, res.live_preview, res.id_live_preview) == (None, None, None, -1)
    progress.add_task_to_queue("task(a)")
    progress.add_task_to_queue("task(b)")
    progress.pending_tasks["task(a)"] = time.time() + 60  # queued later than task(b)
    assert [ask(t).textinfo for t in ("task(a)", "task(b)")] == ["In queue: 2/2", "In queue: 1/2"]
    assert progress.get_pending_tasks().dict() == {"size": 2, "tasks": ["task(a)", "task(b)"]}

    shared.state.begin(job="task(b)")
    progress.start_task("task(b)")
    assert "task(b)" not in progress.pending_tasks and progress.current_task == "task(b)"
    state = shared.state
    assert state.job_count == -1 and ask("task(b)").progress == 0 and ask("task(b)").eta is None
    state.job_count, state.job_no, state.sampling_steps, state.sampling_step = 4, 1, 10, 5
    state.textinfo = "Fusing concepts"
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)
    state.time_start = now - 6.0
    res = ask("task(b)")
    # one job of four done, half of the second: 1/4 + 1/4 * 5/10; the ETA from the start time
    assert (res.active, res.queued, res.completed) == (True, False, False)
    assert res.progress == pytest.approx(0.375) and res.eta == pytest.approx(6.0 / 0.375 - 6.0)
    assert res.textinfo == "Fusing concepts" and res.live_preview is None and res.id_live_preview == -1
    state.job_no = 9  # more jobs than announced: the progress stops at 1
    assert ask("task(b)").progress == 1
    state.sampling_steps = 0
    state.job_no = 2
    assert ask("task(b)").progress == pytest.approx(0.5)

    progress.finish_task("task(b)")
    res = ask("task(b)")
    assert (res.active, res.completed, res.textinfo) == (False, True, "Waiting...")
    assert progress.current_task is None
    for n in range(20):
        progress.finish_task(f"task({n})")
    assert len(progress.finished_tasks) == 16 and progress.finished_tasks[0] == "task(4)"
    for n in range(3):
        progress.record_results(f"task({n})", n)
    assert progress.recorded_results == [("task(1)", 1), ("task(2)", 2)]


def test_state_begin_is_the_hosts(fresh_progress):
    """`begin` stamps the start time and keeps the last job's sampling steps; `end` without a job
    fails as the host's does."""
    import time

    from modules import shared

    state = shared.state
    with pytest.raises(TypeError):
        state.end()
    state.sampling_steps, state.sampling_step, state.textinfo, state.interrupted = 20, 7, "x", True
    before = time.time()
    state.begin(job="task(x)")
    assert state.time_start >= before and state.sampling_steps == 20
    assert (state.sampling_step, state.textinfo, state.interrupted, state.job_count, state.job) == \
        (0, None, False, -1, "task(x)")
    state.end()
    assert (state.job, state.job_count) == ("", 0)


def test_gpu_call_tracks_task_ids_like_the_host(fresh_progress):
    """A first argument exactly `task(...)` (a plain str) is queued before the queue lock, current while
    the job runs, recorded and finished; anything else runs as the task None."""
    import threading
    import time

    from modules import call_queue, shared

    progress = fresh_progress
    seen = {}
    release = threading.Event()
    started = threading.Event()

    def job(*args):
        seen[args[0]] = (progress.current_task, shared.state.job, shared.state.time_start is not None)
        if args[0] == "task(slow)":
            started.set()
            assert release.wait(10)
        return "<p>done</p>", f"<p>{args[0]}</p>"

    wrapped = call_queue.wrap_gradio_gpu_call(job, extra_outputs=[None])
    first = threading.Thread(target=wrapped, args=("task(slow)", 1))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=wrapped, args=("task(next)", 2))
    second.start()
    deadline = time.monotonic() + 10
    while "task(next)" not in progress.pending_tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = progress.progressapi(progress.ProgressRequest(id_task="task(next)"))
    running = progress.progressapi(progress.ProgressRequest(id_task="task(slow)"))
    assert (waiting.queued, waiting.active, waiting.textinfo) == (True, False, "In queue: 1/1")
    assert running.active and progress.current_task == "task(slow)"
    release.set()
    first.join(10)
    second.join(10)
    assert seen["task(slow)"] == ("task(slow)", "task(slow)", True)
    assert seen["task(next)"] == ("task(next)", "task(next)", True)
    assert progress.finished_tasks == ["task(slow)", "task(next)"] and progress.current_task is None
    assert progress.recorded_results[-1] == ("task(next)", ("<p>done</p>", "<p>task(next)</p>"))

    class Text(str):
        pass

    progress.reset()
    for arg in ("task(open", "xtask(a)", Text("task(sub)"), 5):
        out = wrapped(arg)
        assert seen[arg] == (None, None, True) and "Time taken" in out[-1]
    assert progress.finished_tasks == [None] * 4 and not progress.pending_tasks

    def failing(id_task):
        raise RuntimeError("boom")

    out = call_queue.wrap_gradio_gpu_call(failing, extra_outputs=[None])("task(fail)")
    assert out[0] is None and "RuntimeError: boom" in out[1]
    assert progress.finished_tasks[-1] == "task(fail)" and progress.current_task is None
    assert not any(task == "task(fail)" for task, _ in progress.recorded_results)
    assert (shared.state.job, shared.state.job_count) == ("", 0)


def test_queue_lock_runs_waiters_in_arrival_order():
    import threading
    import time

    from modules import call_queue

    lock = call_queue.FIFOLock()
    order = []
    lock.acquire()
    threads = []
    for n in range(6):
        t = threading.Thread(target=lambda n=n: (lock.acquire(), order.append(n), lock.release()))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while len(lock._pending_threads) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert not lock.acquire(blocking=False)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list(range(6))
