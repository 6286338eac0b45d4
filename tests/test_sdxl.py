"""The SDXL test model and the family table: the topology the host runs, measured on the build."""

from __future__ import annotations

import math

import pytest
import torch

from lib_mos.models import family, sdxl
from lib_mos.models.family import SD1, SDXL
from lib_mos.models.sampling import any_multiple_of_8


@pytest.fixture(scope="module")
def tiny() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(seed=0)


def prompt_ids(model, prompts: list[str]) -> torch.Tensor:
    from lib_mos.concepts.binding import tokenize

    return tokenize(model, prompts)


def test_family_rows():
    assert SD1.layers == 16 and SDXL.layers == 70
    assert SDXL.context_dim == 768 + 1280 and SDXL.vector_dim == 1280 + 6 * 256
    assert [t.lora_prefix for t in SDXL.text_encoders] == ["lora_te1_", "lora_te2_"]
    assert SDXL.attn2[:2] == ("input_blocks.4.1.transformer_blocks.0.attn2", "input_blocks.4.1.transformer_blocks.1.attn2")
    assert SDXL.attn2[24] == "middle_block.1.transformer_blocks.0.attn2"
    assert family.family_named("sdxl") is SDXL
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        family.family_named("sd3")


def test_lora_metadata_names_the_family():
    assert family.family_of_lora_metadata({"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert family.family_of_lora_metadata({"ss_base_model_version": "sd_v1"}) == "sd1"
    assert family.family_of_lora_metadata({"ss_base_model_version": "sd_v2_768_v"}) == "sd2"
    assert family.family_of_lora_metadata({"ss_v2": "True"}) == "sd2"
    assert family.family_of_lora_metadata({}) is None


@torch.no_grad()
def test_attn2_layers_are_called_in_family_order(tiny):
    """The table's order is the order one forward calls the layers (what layer-wise contexts and
    per-layer masks are indexed by)."""
    calls: list[str] = []
    modules = dict(tiny.unet.named_modules())
    hooks = [modules[name].register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
             for name in SDXL.attn2]
    try:
        cond = tiny.encode_ids(prompt_ids(tiny, ["a red circle"]), 64, 64)
        tiny.unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context=cond["crossattn"], y=cond["vector"])
    finally:
        for hook in hooks:
            hook.remove()
    assert tuple(calls) == SDXL.attn2
    assert family.family_of_unet(tiny.unet) is SDXL


@torch.no_grad()
@pytest.mark.parametrize(("width", "height"), [(96, 64), (120, 72), (136, 200), (168, 104)])
def test_attention_sizes_match_the_unet(tiny, width, height):
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
             for _, m in family.attn2_modules(tiny.unet)]
    try:
        with any_multiple_of_8():
            tiny.unet(torch.randn(1, 4, height // 8, width // 8), torch.tensor([500.0]),
                      context=torch.randn(1, 77, tiny.config.context_dim), y=torch.randn(1, tiny.config.vector_dim))
    finally:
        for hook in hooks:
            hook.remove()
    sizes = SDXL.attention_sizes(width, height)
    assert [h * w for h, w in sizes] == seen
    assert sizes[0] == (math.ceil(height / 16), math.ceil(width / 16))  # level 1: one ceil halving


def test_full_size_skeleton_has_sdxl_base_shapes():
    model = sdxl.build_sdxl_skeleton()
    params = sum(p.numel() for p in model.unet.parameters())
    assert 2.56e9 < params < 2.57e9  # SDXL base's UNet: 2.567 B
    k = dict(model.unet.named_modules())[SDXL.attn2[0] + ".to_k"]
    assert k.in_features == SDXL.context_dim
    assert model.unet.label_emb[0][0].in_features == SDXL.vector_dim
    te1, te2 = model.text_encoders
    assert te1.config.hidden_size == 768 and te2.config.hidden_size == 1280 and te2.config.num_hidden_layers == 32


@torch.no_grad()
def test_conditioning_is_two_penultimate_states_and_the_pooled_vector(tiny):
    ids = prompt_ids(tiny, ["a red circle", "a blue square"])
    cond = tiny.encode_ids(ids, 64, 48)
    te1, te2 = tiny.text_encoders
    w1 = tiny.config.te1_width
    assert cond["crossattn"].shape == (2, 77, tiny.config.context_dim)
    assert cond["vector"].shape == (2, tiny.config.vector_dim)
    torch.testing.assert_close(cond["crossattn"][..., :w1], te1(input_ids=ids, output_hidden_states=True).hidden_states[-2])
    # OpenCLIP pads with 0 after the first EOS (the host's FrozenOpenCLIPEmbedder2 pads with id 0)
    ids2 = ids.clone()
    for row in ids2:
        first_eos = int((row == 49407).nonzero()[0])
        row[first_eos + 1:] = 0
    out2 = te2(input_ids=ids2, output_hidden_states=True)
    torch.testing.assert_close(cond["crossattn"][..., w1:], out2.hidden_states[-2])
    torch.testing.assert_close(cond["vector"][:, :tiny.config.te2_width], out2.text_embeds)
    assert not torch.equal(cond["crossattn"][0], cond["crossattn"][1])
    # size conditioning: another target size changes only the size part of the vector
    other = tiny.encode_ids(ids, 96, 48)
    pooled = tiny.config.te2_width
    torch.testing.assert_close(other["vector"][:, :pooled], cond["vector"][:, :pooled])
    assert not torch.equal(other["vector"][:, pooled:], cond["vector"][:, pooled:])


def test_size_embedding_matches_sgm_timestep_embedding():
    values = torch.tensor([[1024.0, 768.0]])
    got = sdxl.size_embedding(values, 8)
    half = 4
    freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
    want = [math.cos(1024 * f) for f in freqs] + [math.sin(1024 * f) for f in freqs]
    want += [math.cos(768 * f) for f in freqs] + [math.sin(768 * f) for f in freqs]
    torch.testing.assert_close(got[0], torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_the_tiny_model_depends_only_on_its_seed():
    a, b = sdxl.build_tiny_sdxl(3), sdxl.build_tiny_sdxl(3)
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.unet.out[2].weight, sdxl.build_tiny_sdxl(4).unet.out[2].weight)


@torch.no_grad()
def test_checkpoint_round_trip_in_the_host_layout(tiny, tmp_path):
    """UNet under model.diffusion_model., CLIP-L under conditioner.embedders.0.transformer., bigG in
    OpenCLIP's names under conditioner.embedders.1.model. (fused in_proj, x @ text_projection)."""
    from safetensors import safe_open

    path = sdxl.save_checkpoint(tiny, tmp_path / "xl.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        in_proj = handle.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        projection = handle.get_tensor("conditioner.embedders.1.model.text_projection")
    _, te2 = tiny.text_encoders
    w = tiny.config.te2_width
    assert in_proj.shape == (3 * w, w)
    torch.testing.assert_close(in_proj[w:2 * w], te2.text_model.encoder.layers[0].self_attn.k_proj.weight)
    torch.testing.assert_close(projection, te2.text_projection.weight.t())
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert not any("q_proj" in k for k in keys if k.startswith("conditioner.embedders.1."))
    back = sdxl.load_checkpoint(path)
    ids = prompt_ids(tiny, ["a red circle"])
    a, b = tiny.encode_ids(ids), back.encode_ids(ids)
    torch.testing.assert_close(a["crossattn"], b["crossattn"], rtol=0, atol=0)
    torch.testing.assert_close(a["vector"], b["vector"], rtol=0, atol=0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
    assert torch.equal(tiny.unet(x, t, context=a["crossattn"], y=a["vector"]),
                       back.unet(x, t, context=b["crossattn"], y=b["vector"]))
    from lib_mos.models import sd1

    with pytest.raises(ValueError, match="SDXL checkpoint"):
        sd1.load_checkpoint(path)
    with pytest.raises(ValueError, match="not an SDXL checkpoint"):
        sd1_path = sd1.save_checkpoint(sd1.build_tiny_sd1(0), tmp_path / "sd1.safetensors")
        sdxl.load_checkpoint(sd1_path)
