"""Fused SDXL checkpoints streamed from the base file: each fused layer lands in the host's key
layout (bigG's q/k/v as row thirds of OpenCLIP's in_proj, out_proj/mlp under OpenCLIP's names),
everything else is the base, and the concepts read back as SDXL concepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_mos.concepts.concept import Concept
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion import pipeline as fusion
from lib_mos.models import sd1, sdxl
from lib_mos.models.family import SDXL

TE1 = "0.text_model.encoder.layers.1.self_attn.k_proj"
TE2_Q = "1.text_model.encoder.layers.0.self_attn.q_proj"
TE2_V = "1.text_model.encoder.layers.0.self_attn.v_proj"
TE2_OUT = "1.text_model.encoder.layers.1.self_attn.out_proj"
TE2_FC1 = "1.text_model.encoder.layers.1.mlp.fc1"
UNET = sd1.unet_attention_linear_names(SDXL)[9]  # an attn2 to_k
UNET_OUT = sd1.unet_attention_linear_names(SDXL)[3]  # an attn1 to_out.0 (it has a bias)


@pytest.fixture(scope="module")
def tiny() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def base_path(tiny, tmp_path_factory) -> Path:
    return sdxl.save_checkpoint(tiny, tmp_path_factory.mktemp("base") / "xl.safetensors")


@pytest.fixture(scope="module")
def result(tiny) -> fusion.FusionResult:
    """A hand-made result: new weights for a te1 linear, bigG's q, v, out_proj and fc1, two UNet
    linears, and biases for bigG's q and a UNet to_out."""
    gen = torch.Generator().manual_seed(5)

    def like(root: torch.nn.Module, name: str, attr: str = "weight") -> torch.Tensor:
        return torch.randn(getattr(root.get_submodule(name), attr).shape, generator=gen)

    concept = Concept(name="cat", tokens=("<cat1>", "<cat2>"), family=SDXL, source_sha256="a" * 64,
                      embeddings=torch.randn(2, SDXL.layers, tiny.config.context_dim, generator=gen))
    return fusion.FusionResult(
        text_weights={n: like(tiny.text_root, n) for n in (TE1, TE2_Q, TE2_V, TE2_OUT, TE2_FC1)},
        text_biases={TE2_Q: like(tiny.text_root, TE2_Q, "bias")},
        unet_weights={n: like(tiny.unet, n) for n in (UNET, UNET_OUT)},
        unet_biases={UNET_OUT: like(tiny.unet, UNET_OUT, "bias")},
        concepts=[concept])


def _expected(tiny: sdxl.SDXLModel, result: fusion.FusionResult) -> dict[str, torch.Tensor]:
    """The base model with the fused layers set, in the host layout by the saver's own conversion
    (`te2_to_openclip`, which stacks q/k/v with torch.cat), independent of the fused writer."""
    import copy

    model = sdxl.SDXLModel(unet=copy.deepcopy(tiny.unet), text_root=copy.deepcopy(tiny.text_root), tokenizer=None,
                           alphas_cumprod=tiny.alphas_cumprod, config=tiny.config)
    with torch.no_grad():
        for root, table, attr in ((model.text_root, result.text_weights, "weight"),
                                  (model.text_root, result.text_biases, "bias"),
                                  (model.unet, result.unet_weights, "weight"),
                                  (model.unet, result.unet_biases, "bias")):
            for name, value in table.items():
                getattr(root.get_submodule(name), attr).copy_(value)
    # position_ids is dropped, as from SD1 files: every loader derives it
    return {k: v for k, v in sdxl.checkpoint_tensors(model).items() if not k.endswith("position_ids")}


def _write(base_path: Path, result, out: Path, dtype=torch.float32) -> Path:
    with safe_open(str(base_path), framework="pt") as fh:
        base_meta = {sdxl.CONFIG_METADATA_KEY: fh.metadata()[sdxl.CONFIG_METADATA_KEY]}
    inputs = [fusion.FusionInput(c) for c in result.concepts]
    meta = fused_checkpoint.fused_metadata(inputs, fusion.FusionSettings(), result, base_meta, family=SDXL)
    return fused_checkpoint.write_fused_checkpoint(base_path, result, out, meta, dtype=dtype)


def test_sdxl_fused_layers_land_in_the_host_layout(tiny, base_path, result, tmp_path):
    out = _write(base_path, result, tmp_path / "fused.safetensors")
    written = load_file(str(out))
    expected = _expected(tiny, result)
    rows = {k for k in written if k.startswith(fused_checkpoint.FUSED_EMBEDDING_PREFIX)}
    assert set(written) - rows == set(expected)
    for key, value in expected.items():  # fused layers and every untouched tensor
        assert torch.equal(written[key], value), key
    base = load_file(str(base_path))
    changed = {k for k in expected if not torch.equal(base[k], expected[k])}
    w = tiny.config.te2_width
    in_proj = sdxl.TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"
    assert changed == {
        sdxl.TE1_PREFIX + TE1.removeprefix("0.") + ".weight", in_proj,
        sdxl.TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_bias",
        sdxl.TE2_PREFIX + "transformer.resblocks.1.attn.out_proj.weight",
        sdxl.TE2_PREFIX + "transformer.resblocks.1.mlp.c_fc.weight",
        *(f"{SDXL.unet_prefix}{n}.weight" for n in (UNET, UNET_OUT)), f"{SDXL.unet_prefix}{UNET_OUT}.bias"}
    # the OpenCLIP layout spelt out: q, k, v row blocks; k stays the base's
    assert torch.equal(written[in_proj][:w], result.text_weights[TE2_Q])
    assert torch.equal(written[in_proj][w:2 * w], base[in_proj][w:2 * w])
    assert torch.equal(written[in_proj][2 * w:], result.text_weights[TE2_V])

    loaded = sdxl.load_checkpoint(out)
    for root, table, attr in ((loaded.text_root, result.text_weights, "weight"),
                              (loaded.text_root, result.text_biases, "bias"),
                              (loaded.unet, result.unet_weights, "weight"),
                              (loaded.unet, result.unet_biases, "bias")):
        for name, value in table.items():
            assert torch.equal(getattr(root.get_submodule(name), attr), value), name
    fused = {*result.text_weights, *result.unet_weights}
    for root, prefix in ((tiny.text_root, ""), (tiny.unet, "unet.")):
        live = dict((loaded.text_root if prefix == "" else loaded.unet).named_parameters())
        for name, param in root.named_parameters():
            module, attr = name.rsplit(".", 1)
            if module not in fused:
                assert torch.equal(live[name], param), prefix + name

    concepts = fused_checkpoint.read_fused_concepts(out)
    assert [c.tokens for c in concepts] == [("<cat1>", "<cat2>")]
    assert concepts[0].family is SDXL and torch.equal(concepts[0].embeddings, result.concepts[0].embeddings)
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta[fused_checkpoint.FUSED_METADATA_KEY])["family"] == "sdxl"
    assert meta[sdxl.CONFIG_METADATA_KEY] == tiny.config.to_json()


def test_sdxl_fused_checkpoint_in_half_precision(tiny, base_path, result, tmp_path):
    """Floats are cast to the saved dtype (the in_proj assembled from base and fused rows too);
    the concept rows stay float32."""
    out = _write(base_path, result, tmp_path / "fp16.safetensors", dtype=torch.float16)
    written = load_file(str(out))
    expected = _expected(tiny, result)
    assert all(torch.equal(written[k], v.half()) for k, v in expected.items())
    assert written[f"{fused_checkpoint.FUSED_EMBEDDING_PREFIX}1"].dtype == torch.float32
    assert fused_checkpoint.read_fused_concepts(out)[0].family is SDXL


def test_a_shape_mismatch_names_the_key_and_writes_nothing(base_path, result, tmp_path):
    from lib_mos.concepts.concept import ConceptError

    bad = fusion.FusionResult(text_weights={TE2_Q: torch.zeros(3, 3)})
    with pytest.raises(ConceptError, match=r"resblocks\.0\.attn\.in_proj_weight"):
        _write(base_path, bad, tmp_path / "bad.safetensors")
    missing = fusion.FusionResult(unet_weights={"input_blocks.99.1.proj_in": torch.zeros(3, 3)})
    with pytest.raises(ConceptError, match=r"no key model\.diffusion_model\.input_blocks\.99"):
        _write(base_path, missing, tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_old_fused_files_read_as_sd1(tmp_path):
    """A file from before the `family` field: SD1 concepts (16 layers for a trigger-word concept)."""
    from safetensors.torch import save_file

    info = {"format": "mos-fused", "version": 1,
            "concepts": [{"name": "cat", "tokens": ["<c>"]}, {"name": "hero", "tokens": [], "triggers": ["ohwx"]}]}
    path = tmp_path / "old.safetensors"
    save_file({"mos_fusion.embedding.0": torch.ones(1, 16, 32)[0]}, str(path),
              metadata={fused_checkpoint.FUSED_METADATA_KEY: json.dumps(info)})
    cat, hero = fused_checkpoint.read_fused_concepts(path)
    assert cat.family.name == "sd1" and cat.embeddings.shape == (1, 16, 32)
    assert hero.family.name == "sd1" and hero.embeddings.shape == (0, 16, 0)


def test_fuse_checkpoint_takes_an_sdxl_base(tiny, base_path, result, tmp_path, monkeypatch):
    """The file says SDXL: the model is loaded as SDXL in bfloat16 on the CPU, the fused file keeps
    the SDXL config metadata and names the family."""
    seen = {}

    def fake_fuse(model, inputs, settings, **kwargs):
        seen["model"] = model
        return result

    monkeypatch.setattr(fused_checkpoint, "fuse", fake_fuse)
    spec = fused_checkpoint.ConceptSpec(str(tmp_path / "cat.safetensors"), concept=result.concepts[0])
    out, _ = fused_checkpoint.fuse_checkpoint(base_path, [spec], tmp_path / "out.safetensors",
                                              dtype=torch.float32)
    model = seen["model"]
    assert isinstance(model, sdxl.SDXLModel) and next(model.unet.parameters()).dtype == torch.bfloat16
    expected = _expected(tiny, result)
    assert all(torch.equal(v, expected[k]) for k, v in load_file(str(out)).items()
               if not k.startswith(fused_checkpoint.FUSED_EMBEDDING_PREFIX))
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert set(meta) == {fused_checkpoint.FUSED_METADATA_KEY, sdxl.CONFIG_METADATA_KEY}
    assert json.loads(meta[fused_checkpoint.FUSED_METADATA_KEY])["family"] == "sdxl"
