"""The host double follows A1111 v1.10.1: CFG row layout in every batching mode
(../shared/DESIGN.md section 6), script hook routing, callbacks, checkpoints and embeddings."""

from __future__ import annotations

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
    """DESIGN.md section 6, written down independently of the double's code."""
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
