"""The host double runs SDXL as A1111 v1.10.1 does (tests/host/README.md): sgm's DiffusionEngine and
GeneralConditioner, the SDXL hijack, dict conditioning through the CFG denoiser, and the built-in
Lora on both text encoders (OpenCLIP's MultiheadAttention included) and the UNet."""

from __future__ import annotations

import pytest
import torch

from lib_mos.models import sdxl

LONG = ", ".join(["a very detailed photo of a red cat"] * 12)  # > 75 tokens: a second chunk


def encode(host, text: str, *, negative: bool = False, width: int = 64, height: int = 64) -> dict:
    from modules import prompt_parser

    batch = prompt_parser.SdConditioning([text], is_negative_prompt=negative, width=width, height=height)
    with torch.no_grad():
        cond = host.model.get_learned_conditioning(batch)
    return {k: v[0] for k, v in cond.items()}


class RowRecorder:
    """Labels every UNet row by the encoding (crossattn and vector) it was called with."""

    def __init__(self, host, conds: dict[tuple, dict]):
        self.unet = host.model.model.diffusion_model
        self.conds = conds
        self.calls: list[list[tuple]] = []

    def label(self, context: torch.Tensor, y: torch.Tensor) -> tuple:
        for key, cond in self.conds.items():
            n = cond["crossattn"].shape[0]
            if context.shape[0] >= n and torch.equal(context[:n], cond["crossattn"]) and torch.equal(y, cond["vector"]):
                return key
        raise AssertionError("UNet row matches no known prompt encoding")

    def __enter__(self):
        original = self.unet.forward

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            assert y is not None and context.shape[0] == y.shape[0] == x.shape[0]
            self.calls.append([self.label(c, v) for c, v in zip(context, y)])
            return original(x, timesteps, context=context, y=y, **kwargs)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        del self.unet.forward


# ------------------------------------------------------------------------------------ the model
def test_sdxl_checkpoint_loads_as_the_hosts_model(host_xl):
    """Detected by its `conditioner.embedders.1.model.ln_final.weight`; sgm's classes; the hijack's
    wrappers; cond_stage_model is the conditioner; alphas_cumprod from the legacy DDPM schedule."""
    import numpy as np
    from sgm.models.diffusion import DiffusionEngine
    from sgm.modules import GeneralConditioner
    from sgm.modules import attention as sgm_attention
    from sgm.modules.encoders import modules as enc

    from lib_mos.models.family import SDXL
    from modules import sd_hijack, sd_hijack_clip, sd_hijack_open_clip

    m = host_xl.model
    assert type(m) is DiffusionEngine
    assert (m.is_sdxl, m.is_sd1, m.is_sd2, m.is_sdxl_inpaint) == (True, False, False, False)
    assert m.cond_stage_model is m.conditioner and isinstance(m.conditioner, GeneralConditioner)
    e = m.conditioner.embedders
    assert type(e[0]) is sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords
    assert type(e[1]) is sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords
    assert [type(x) for x in e[2:]] == [enc.ConcatTimestepEmbedderND] * 3
    assert [x.input_key for x in e] == ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left",
                                        "target_size_as_tuple"]
    assert (e[0].wrapped.layer, e[0].wrapped.layer_idx) == ("hidden", sdxl.TINY_SDXL.te1_layers - 1)
    assert (e[1].wrapped.layer, e[1].wrapped.legacy, e[1].return_pooled) == ("penultimate", False, True)
    assert e[1].id_pad == 0 and e[0].id_pad == e[0].id_end
    assert type(e[1].wrapped.model.token_embedding) is sd_hijack.EmbeddingsWithFixes
    assert e[1].wrapped.model.token_embedding.textual_inversion_key == "clip_g"
    assert e[0].wrapped.transformer.text_model.embeddings.token_embedding.textual_inversion_key == "clip_l"
    attn = dict(m.model.diffusion_model.named_modules())
    assert all(type(attn[n]) is sgm_attention.CrossAttention for n in SDXL.attn2)
    assert type(attn[SDXL.attn2[0].replace("attn2", "attn1")]) is sgm_attention.CrossAttention
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    torch.testing.assert_close(m.alphas_cumprod, torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
    assert m.model.conditioning_key == "crossattn" and m.parameterization == "eps"
    torch.testing.assert_close(m.cond_stage_model_empty_prompt, m.get_learned_conditioning([""])["crossattn"])
    # weights are the file's
    ref = sdxl.load_checkpoint(m.sd_checkpoint_info.filename)
    torch.testing.assert_close(m.model.diffusion_model.state_dict()["out.2.weight"], ref.unet.state_dict()["out.2.weight"])
    tower = e[1].wrapped.model
    te2 = ref.text_root[1].text_model.encoder.layers[0].self_attn
    torch.testing.assert_close(tower.transformer.resblocks[0].attn.in_proj_weight,
                               torch.cat([te2.q_proj.weight, te2.k_proj.weight, te2.v_proj.weight]))

    sd_hijack.model_hijack.undo_hijack(m)
    try:
        assert not hasattr(m, "cond_stage_model")
        assert type(m.conditioner.embedders[0]) is enc.FrozenCLIPEmbedder
        assert type(m.conditioner.embedders[1]) is enc.FrozenOpenCLIPEmbedder2
        assert type(m.conditioner.embedders[1].model.token_embedding) is torch.nn.Embedding
    finally:
        sd_hijack.model_hijack.hijack(m)


def test_sdxl_conditioning_matches_lib_mos_and_the_hosts_batch(host_xl):
    """A plain one-chunk prompt encodes as lib_mos's SDXLModel.encode_ids at the batch's size; an
    all-empty negative batch is zeros (crossattn and pooled), its size features kept; a batch
    without size attributes gets 1024."""
    from modules import shared

    ref = sdxl.load_checkpoint(host_xl.model.sd_checkpoint_info.filename)
    prompt = "a photo of a cat, sitting on grass"
    ids = ref.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    want = ref.encode_ids(ids, width=64, height=96)
    got = encode(host_xl, prompt, width=64, height=96)
    assert got["crossattn"].shape == (77, sdxl.TINY_SDXL.context_dim)
    assert got["vector"].shape == (sdxl.TINY_SDXL.vector_dim,)
    torch.testing.assert_close(got["crossattn"], want["crossattn"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["vector"], want["vector"][0], rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        plain = host_xl.model.get_learned_conditioning([prompt])
    torch.testing.assert_close(plain["vector"][0], ref.encode_ids(ids)["vector"][0], rtol=1e-4, atol=1e-5)

    pooled = sdxl.TINY_SDXL.te2_width
    neg = encode(host_xl, "", negative=True)
    assert torch.count_nonzero(neg["crossattn"]) == 0 and torch.count_nonzero(neg["vector"][:pooled]) == 0
    torch.testing.assert_close(neg["vector"][pooled:], encode(host_xl, "")["vector"][pooled:])
    assert torch.count_nonzero(encode(host_xl, "")["crossattn"]) > 0  # only a negative batch is zeroed
    assert torch.count_nonzero(encode(host_xl, "blurry", negative=True)["crossattn"]) > 0

    shared.opts.sdxl_crop_top = 8
    crop = encode(host_xl, prompt, width=64, height=96)["vector"]
    assert not torch.equal(crop, got["vector"])
    torch.testing.assert_close(crop[pooled + 2 * 8:pooled + 4 * 8],
                               sdxl.size_embedding(torch.tensor([[8.0, 0.0]]), 8)[0])


def test_sdxl_prompt_features_go_through_both_encoders(host_xl):
    """Chunks, BREAK and emphasis reach both encoders (the base class); OpenCLIP ids after the end
    token become 0; the pooled vector is the first chunk's."""
    e = host_xl.model.conditioner.embedders
    long = encode(host_xl, LONG)
    assert long["crossattn"].shape[0] == 154
    assert encode(host_xl, "a cat BREAK a dog")["crossattn"].shape[0] == 154
    first = encode(host_xl, ", ".join(["a very detailed photo of a red cat"] * 12)[:200])
    assert first["vector"].shape == long["vector"].shape
    plain, weighted = encode(host_xl, "a cat"), encode(host_xl, "a (cat:1.5)")
    w1 = sdxl.TINY_SDXL.te1_width
    assert not torch.equal(plain["crossattn"][:, :w1], weighted["crossattn"][:, :w1])
    assert not torch.equal(plain["crossattn"][:, w1:], weighted["crossattn"][:, w1:])
    seen = []
    tower = e[1].wrapped
    original = tower.encode_with_transformer
    tower.encode_with_transformer = lambda tokens: seen.append(tokens.clone()) or original(tokens)
    try:
        encode(host_xl, "a cat")
    finally:
        del tower.encode_with_transformer
    ids = seen[0][0].tolist()
    end = ids.index(e[1].id_end)
    assert ids[0] == e[1].id_start and set(ids[end + 1:]) == {0}


# -------------------------------------------------------------------------------- attention
def test_sgm_attention_is_replaced_at_class_level_and_gets_sgm_keywords(host_xl):
    """Both ldm's and sgm's CrossAttention.forward are the optimisation's; sgm's block hands
    attn1 `additional_tokens` and `n_times_crossframe_attn_in_self`, attn2 `additional_tokens`."""
    from ldm.modules.attention import CrossAttention as LdmCrossAttention
    from sgm.modules.attention import CrossAttention

    from modules import sd_hijack_optimizations

    assert CrossAttention.forward is sd_hijack_optimizations.scaled_dot_product_attention_forward
    assert LdmCrossAttention.forward is sd_hijack_optimizations.scaled_dot_product_attention_forward
    unet = host_xl.model.model.diffusion_model
    block = unet.input_blocks[4][1].transformer_blocks[0]
    seen = {}
    hooks = [getattr(block, n).register_forward_pre_hook(lambda mod, args, kwargs, n=n: seen.__setitem__(n, kwargs),
                                                         with_kwargs=True) for n in ("attn1", "attn2")]
    try:
        host_xl.txt2img("a cat", steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert seen["attn1"] == {"context": None, "additional_tokens": None, "n_times_crossframe_attn_in_self": 0}
    assert set(seen["attn2"]) == {"context", "additional_tokens"} and seen["attn2"]["additional_tokens"] is None

    sd_hijack_optimizations.undo()
    try:
        assert CrossAttention.forward is sd_hijack_optimizations._original_sgm_forward
        x = torch.randn(1, 5, 64)
        extra = torch.randn(1, 2, 64)
        out = block.attn1(x, additional_tokens=extra)
        assert out.shape == x.shape
    finally:
        sd_hijack_optimizations.apply()


# -------------------------------------------------------------------------------------- CFG
def expected_calls(cond_rows, uncond_rows, batch_size, *, batch_cond_uncond, same_length, skip_uncond=False):
    if same_length or skip_uncond:
        rows = cond_rows + ([] if skip_uncond else uncond_rows)
        if batch_cond_uncond:
            return [rows]
        return [rows[a:a + batch_size] for a in range(0, len(rows), batch_size)]
    chunk = 2 * batch_size if batch_cond_uncond else batch_size
    return [*[cond_rows[a:a + chunk] for a in range(0, len(cond_rows), chunk)], uncond_rows]


@pytest.mark.parametrize(("batch_cond_uncond", "long_cond"), [(True, False), (False, False), (True, True),
                                                              (False, True)])
def test_sdxl_cfg_rows_in_every_batching_mode(host_xl, batch_cond_uncond, long_cond):
    """The SD1 row layout with dict conds: crossattn and vector of each row belong to the same
    prompt; the callback gets DictWithShape text_cond / text_uncond."""
    from modules import prompt_parser, script_callbacks, shared

    shared.opts.batch_cond_uncond = batch_cond_uncond
    prompts = ["a cat AND sunny", "a dog AND sunny"]
    if long_cond:
        prompts = [f"{LONG} AND sunny", "a dog AND sunny"]
    negatives = ["blurry", "dark"]
    conds = {("c", 0, 0): encode(host_xl, prompts[0].split(" AND ")[0]),
             ("c", 1, 0): encode(host_xl, prompts[1].split(" AND ")[0]),
             ("c", "any", 1): encode(host_xl, "sunny"),
             ("u", 0): encode(host_xl, "blurry", negative=True), ("u", 1): encode(host_xl, "dark", negative=True)}
    cond_rows = [("c", 0, 0), ("c", "any", 1), ("c", 1, 0), ("c", "any", 1)]
    params = []
    script_callbacks.on_cfg_denoiser(lambda p: params.append((type(p.text_cond), type(p.text_uncond),
                                                              tuple(p.text_cond.shape), dict(p.text_cond))))
    with RowRecorder(host_xl, conds) as rec:
        host_xl.txt2img(prompts, negatives, batch_size=2, steps=2)
    per_step = expected_calls(cond_rows, [("u", 0), ("u", 1)], 2, batch_cond_uncond=batch_cond_uncond,
                              same_length=not long_cond)
    assert rec.calls == per_step * 2
    assert [p[:2] for p in params] == [(prompt_parser.DictWithShape, prompt_parser.DictWithShape)] * 2
    assert params[0][2] == (4, 154 if long_cond else 77, sdxl.TINY_SDXL.context_dim)
    assert set(params[0][3]) == {"crossattn", "vector"}


@pytest.mark.parametrize("mode", ["pad", "pad_v0"])
def test_sdxl_pad_cond_uncond_pads_only_crossattn(host_xl, mode):
    """pad_cond_uncond appends the empty prompt's crossattn; _v0 repeats the uncond's last vector;
    either way one call, and the vector is untouched."""
    from modules import shared

    setattr(shared.opts, "pad_cond_uncond" if mode == "pad" else "pad_cond_uncond_v0", True)
    cond, uncond = encode(host_xl, LONG), encode(host_xl, "blurry", negative=True)
    contexts = []
    unet = host_xl.model.model.diffusion_model
    original = unet.forward

    def forward(x, timesteps=None, context=None, y=None, **kwargs):
        contexts.append((context.clone(), y.clone()))
        return original(x, timesteps, context=context, y=y, **kwargs)

    unet.forward = forward
    try:
        host_xl.txt2img(LONG, "blurry", steps=1)
    finally:
        del unet.forward
    assert len(contexts) == 1
    context, y = contexts[0]
    torch.testing.assert_close(context[0], cond["crossattn"])
    torch.testing.assert_close(y, torch.stack([cond["vector"], uncond["vector"]]))
    torch.testing.assert_close(context[1, :77], uncond["crossattn"])
    tail = (host_xl.model.cond_stage_model_empty_prompt[0] if mode == "pad"
            else uncond["crossattn"][-1:].expand(77, -1))
    torch.testing.assert_close(context[1, 77:], tail)


@pytest.mark.parametrize("mode", ["ngms", "skip_early"])
def test_sdxl_uncond_rows_dropped(host_xl, mode):
    from modules import shared

    fields = {}
    if mode == "skip_early":
        shared.opts.skip_early_cond = 0.5
        skipped = [True, True, False]  # step / 3 <= 0.5 for steps 0, 1
    else:
        fields["s_min_uncond"] = 1000.0
        skipped = [False, True, False]
    conds = {("c", 0, 0): encode(host_xl, "a cat"), ("u", 0): encode(host_xl, "blurry", negative=True)}
    with RowRecorder(host_xl, conds) as rec:
        res = host_xl.txt2img("a cat", "blurry", steps=3, **fields)
    assert rec.calls == [[("c", 0, 0)] if s else [("c", 0, 0), ("u", 0)] for s in skipped]
    assert ("Skip Early CFG" if mode == "skip_early" else "NGMS") in res.info


def test_sdxl_empty_negative_and_hires_fix(host_xl):
    """An empty negative prompt is the zero conditioning; the hires pass conditions on its own size
    (the vector's size features are those of hr_upscale_to_x/y)."""
    from modules import script_callbacks

    seen = []
    script_callbacks.on_cfg_denoiser(lambda p: seen.append((p.x.shape[-2:], p.text_cond["vector"].clone(),
                                                            p.text_uncond["crossattn"].clone())))
    res = host_xl.txt2img("a cat", "", steps=1, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent",
                          denoising_strength=0.5, hr_second_pass_steps=1)
    assert len(res.images) == 1 and res.images[0].size == (96, 96)
    (s1, v1, u1), (s2, v2, _) = seen
    assert (tuple(s1), tuple(s2)) == ((8, 8), (12, 12))
    assert torch.count_nonzero(u1) == 0
    torch.testing.assert_close(v1[0], encode(host_xl, "a cat")["vector"])
    torch.testing.assert_close(v2[0], encode(host_xl, "a cat", width=96, height=96)["vector"])


def test_sdxl_txt2img_runs_end_to_end(host_xl):
    res = host_xl.txt2img("a cat", "blurry", steps=2, batch_size=2)
    assert [im.size for im in res.images] == [(64, 64), (64, 64)]
    assert torch.isfinite(res.images[0].latent).all()


# ------------------------------------------------------------------------------------- Lora
def save_lora(lora, name: str) -> str:
    from modules import shared

    return str(lora.save(shared.cmd_opts.lora_dir, name))


def test_sdxl_lora_names_and_key_conversion(host_xl):
    """Embedder modules are named `{i}_{name}`; lora_te2_ converts to OpenCLIP's resblocks with q/k/v
    resolving to the MultiheadAttention (out_proj is its own Linear); te1 and UNet fall back to
    the `0_transformer_text_model` / `diffusion_model` spellings."""
    import networks

    host_xl.txt2img("a cat", steps=1)
    networks.assign_network_names_to_compvis_modules(host_xl.model)
    mapping = host_xl.model.network_layer_mapping
    tower = host_xl.model.conditioner.embedders[1].wrapped.model
    assert mapping["1_model_transformer_resblocks_0_attn"] is tower.transformer.resblocks[0].attn
    assert mapping["1_model_transformer_resblocks_0_attn_out_proj"] is tower.transformer.resblocks[0].attn.out_proj
    assert "0_transformer_text_model_encoder_layers_0_self_attn_q_proj" in mapping
    assert "model_transformer_resblocks" not in mapping  # so not taken for SD2
    assert not any(k.startswith(("2_", "3_", "4_")) for k in mapping)
    convert = networks.convert_diffusers_name_to_compvis
    assert convert("lora_te2_text_model_encoder_layers_1_mlp_fc1", False) == "1_model_transformer_resblocks_1_mlp_c_fc"
    assert convert("lora_te2_text_model_encoder_layers_1_mlp_fc2", False) == "1_model_transformer_resblocks_1_mlp_c_proj"
    assert convert("lora_te2_text_model_encoder_layers_1_self_attn_k_proj", False) == \
        "1_model_transformer_resblocks_1_attn_k_proj"
    m = networks.re_x_proj.match("1_model_transformer_resblocks_1_attn_k_proj")
    assert mapping[m.group(1)] is tower.transformer.resblocks[1].attn


def _delta(tensors, stem, rank, alpha, mult):
    up, down = tensors[f"{stem}.lora_up.weight"].float(), tensors[f"{stem}.lora_down.weight"].float()
    return (up @ down) * (alpha / rank) * mult


def test_sdxl_kohya_lora_applies_the_host_math_and_restores(host_xl):
    """A kohya SDXL LoRA through <lora:x:te:unet> changes CLIP-L linears, OpenCLIP's fused in_proj
    (q, k, v stacked) and out_proj, its mlp, and the UNet, each by up @ down * alpha / rank * the
    multiplier; a generation without the tag restores them exactly."""
    import lora_layouts as layouts

    from modules import errors

    ref = sdxl.load_checkpoint(host_xl.model.sd_checkpoint_info.filename)
    lora = layouts.kohya_lora(ref, few=True, spelling="ldm", dtype=torch.float32, rank=4, alpha=2.0)
    save_lora(lora, "xl")
    t = lora.tensors
    m = host_xl.model
    te1 = m.conditioner.embedders[0].wrapped.transformer.text_model.encoder.layers[0]
    blk = m.conditioner.embedders[1].wrapped.model.transformer.resblocks[0]
    attn2_k = m.model.diffusion_model.input_blocks[4][1].transformer_blocks[0].attn2.to_k
    stems = {"te1_q": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
             "te2": "lora_te2_text_model_encoder_layers_0_", "mlp": "lora_te2_text_model_encoder_layers_0_mlp_fc1",
             "unet": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"}
    assert f"{stems['te1_q']}.lora_up.weight" in t and f"{stems['unet']}.lora_up.weight" in t
    assert all(f"{stems['te2']}self_attn_{p}_proj.lora_up.weight" in t for p in ("q", "k", "v", "out"))
    orig = {"te1": te1.self_attn.q_proj.weight.clone(), "in": blk.attn.in_proj_weight.clone(),
            "out": blk.attn.out_proj.weight.clone(), "out_b": blk.attn.out_proj.bias.clone(),
            "mlp": blk.mlp.c_fc.weight.clone(), "unet": attn2_k.weight.clone()}

    host_xl.txt2img("a cat <lora:xl:0.5:2>", steps=1)
    te2 = stems["te2"]
    qkv = torch.cat([_delta(t, f"{te2}self_attn_{p}_proj", 4, 2.0, 0.5) for p in "qkv"])
    torch.testing.assert_close(te1.self_attn.q_proj.weight, orig["te1"] + _delta(t, stems["te1_q"], 4, 2.0, 0.5))
    torch.testing.assert_close(blk.attn.in_proj_weight, orig["in"] + qkv)
    torch.testing.assert_close(blk.attn.out_proj.weight, orig["out"] + _delta(t, f"{te2}self_attn_out_proj", 4, 2.0, 0.5))
    assert torch.equal(blk.attn.out_proj.bias, orig["out_b"])
    torch.testing.assert_close(blk.mlp.c_fc.weight, orig["mlp"] + _delta(t, stems["mlp"], 4, 2.0, 0.5))
    torch.testing.assert_close(attn2_k.weight, orig["unet"] + _delta(t, stems["unet"], 4, 2.0, 2.0))
    assert errors.reported == []

    host_xl.txt2img("a cat", steps=1)
    for now, before in ((te1.self_attn.q_proj.weight, orig["te1"]), (blk.attn.in_proj_weight, orig["in"]),
                        (blk.attn.out_proj.weight, orig["out"]), (blk.mlp.c_fc.weight, orig["mlp"]),
                        (attn2_k.weight, orig["unet"])):
        assert torch.equal(now, before)


def test_sdxl_te2_lora_without_v_changes_nothing_in_that_attention(host_xl):
    """The MultiheadAttention path needs q, k, v and out: a file missing v for layer 0 leaves that
    layer's in_proj and out_proj as they were (out_proj's own Linear forward is never called),
    while layer 1, complete, changes."""
    import lora_layouts as layouts

    ref = sdxl.load_checkpoint(host_xl.model.sd_checkpoint_info.filename)
    lora = layouts.kohya_lora(ref, dtype=torch.float32)
    v0 = "lora_te2_text_model_encoder_layers_0_self_attn_v_proj."
    lora.tensors = {k: v for k, v in lora.tensors.items() if not k.startswith(v0)}
    save_lora(lora, "nov")
    blocks = host_xl.model.conditioner.embedders[1].wrapped.model.transformer.resblocks
    before = [(b.attn.in_proj_weight.clone(), b.attn.out_proj.weight.clone(), b.mlp.c_fc.weight.clone())
              for b in blocks]
    host_xl.txt2img("a cat <lora:nov:1>", steps=1)
    assert torch.equal(blocks[0].attn.in_proj_weight, before[0][0])
    assert torch.equal(blocks[0].attn.out_proj.weight, before[0][1])
    assert not torch.equal(blocks[0].mlp.c_fc.weight, before[0][2])  # other layers of block 0 still apply
    assert not torch.equal(blocks[1].attn.in_proj_weight, before[1][0])
    assert not torch.equal(blocks[1].attn.out_proj.weight, before[1][1])


def test_sdxl_embedding_inserts_clip_l_and_clip_g_vectors(host_xl):
    """An SDXL embedding file ({"clip_l", "clip_g"}) has the width of both encoders together; each
    encoder's EmbeddingsWithFixes inserts its own key's vectors."""
    import safetensors.torch

    from modules import shared
    from modules.sd_hijack import model_hijack

    cfg = sdxl.TINY_SDXL
    gen = torch.Generator().manual_seed(3)
    vecs = {"clip_l": torch.randn(2, cfg.te1_width, generator=gen), "clip_g": torch.randn(2, cfg.te2_width, generator=gen)}
    safetensors.torch.save_file(vecs, f"{shared.cmd_opts.embeddings_dir}/xlemb.safetensors")
    model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    assert model_hijack.embedding_db.word_embeddings["xlemb"].shape == cfg.te1_width + cfg.te2_width
    seen = {}
    e = host_xl.model.conditioner.embedders
    for i, wrapper in ((0, e[0].wrapped.transformer.text_model.embeddings.token_embedding),
                       (1, e[1].wrapped.model.token_embedding)):
        wrapper.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out.clone()))
    encode(host_xl, "a xlemb cat")
    torch.testing.assert_close(seen[0][0, 2:4], vecs["clip_l"])
    torch.testing.assert_close(seen[1][0, 2:4], vecs["clip_g"])
