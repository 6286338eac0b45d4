"""SD1 topology, tiny/skeleton builders, checkpoint IO and the offline CLIP tokenizer."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lib_mos.files import atomic_save_safetensors
from lib_mos.models import sd1
from lib_mos.models.clip_tokenizer import VOCAB_SIZE, load_clip_tokenizer
from lib_mos.models.family import attn2_modules

REPO = Path(__file__).resolve().parents[1]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
Tensors = dict[str, torch.Tensor]
Meta = dict[str, str]
Edit = Callable[[Tensors, Meta], tuple[Tensors, Meta]]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module builds the tokenizer cache from scratch in a folder of its own."""
    folder = tmp_path_factory.mktemp("mos_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOS_CACHE_DIR", str(folder))
        mp.delenv("MOS_CLIP_VOCAB", raising=False)
        yield folder


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


@pytest.fixture(scope="module")
def skeleton() -> sd1.SD1Model:
    return sd1.build_sd15_skeleton()


def _state_digest(model: sd1.SD1Model) -> str:
    digest = hashlib.sha256()
    for part in (model.unet, model.text_encoder):
        for key, value in part.state_dict().items():
            digest.update(key.encode())
            digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_matches_sd15(_private_cache: Path) -> None:
    tok = load_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == VOCAB_SIZE
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert load_clip_tokenizer() is tok  # one instance per process
    folder = _private_cache / "clip-vit-large-patch14-tokenizer"
    assert (folder / "merges.txt").read_text(encoding="utf-8").split("\n", 1)[0] == "#version: 0.2"
    assert _no_temp_files(_private_cache)


def test_tokenizer_builds_into_explicit_dir(tmp_path: Path) -> None:
    tok = load_clip_tokenizer(cache_dir=tmp_path / "tok")
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_tokenizer_missing_vocab_names_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip_tokenizer(missing)
    monkeypatch.setenv("MOS_CLIP_VOCAB", str(missing))
    with pytest.raises(FileNotFoundError, match="MOS_CLIP_VOCAB"):
        load_clip_tokenizer()


# ------------------------------------------------------------------------------------------- topology


def test_names_are_sd1_order() -> None:
    assert len(sd1.ATTN2_NAMES) == 16 == len(set(sd1.ATTN2_NAMES))
    assert sd1.ATTN2_NAMES[0] == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert sd1.ATTN2_NAMES[6] == "middle_block.1.transformer_blocks.0.attn2"
    assert sd1.ATTN2_NAMES[7] == "output_blocks.3.1.transformer_blocks.0.attn2"
    assert sd1.ATTN2_NAMES[-1] == "output_blocks.11.1.transformer_blocks.0.attn2"
    unet_names = sd1.unet_attention_linear_names()
    assert len(unet_names) == 128 == len(set(unet_names))
    assert unet_names[:5] == [
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_q",
    ]
    text_names = sd1.text_attention_linear_names()
    assert len(text_names) == 48 and text_names[-1] == "text_model.encoder.layers.11.self_attn.out_proj"
    assert len(sd1.text_attention_linear_names(2)) == 8


def _check_topology(model: sd1.SD1Model) -> None:
    from ldm.modules.attention import CrossAttention

    pairs = attn2_modules(model.unet)
    assert [name for name, _ in pairs] == list(sd1.ATTN2_NAMES)
    assert all(isinstance(mod, CrossAttention) for _, mod in pairs)
    for name in sd1.unet_attention_linear_names():
        assert isinstance(model.unet.get_submodule(name), nn.Linear), name
    for name in sd1.text_attention_linear_names(model.config.text_layers):
        assert isinstance(model.text_encoder.get_submodule(name), nn.Linear), name
    for _, mod in pairs:
        assert mod.to_k.in_features == model.config.context_dim
        assert mod.heads == model.config.unet_num_heads


def test_tiny_topology(tiny: sd1.SD1Model) -> None:
    _check_topology(tiny)
    assert not tiny.unet.training and not tiny.text_encoder.training
    assert all(p.dtype == torch.float32 for p in tiny.unet.parameters())
    assert tiny.config == sd1.TINY_SD1


def test_skeleton_topology(skeleton: sd1.SD1Model) -> None:
    _check_topology(skeleton)
    assert skeleton.tokenizer is None and skeleton.config == sd1.SD15
    assert skeleton.unet.get_submodule(sd1.ATTN2_NAMES[0]).to_k.weight.shape == (320, 768)
    assert all(p.is_meta for p in skeleton.unet.parameters())
    assert sum(p.numel() for p in skeleton.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in skeleton.text_encoder.parameters()) == 123_060_480


def test_attn2_modules_rejects_other_unets() -> None:
    with pytest.raises(ValueError, match="unknown UNet: 0 attn2 layers"):
        attn2_modules(nn.Sequential(nn.Linear(2, 2)))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        sd1.SD1Config(model_channels=48)
    assert sd1.SD1Config.from_json(sd1.TINY_SD1.to_json()) == sd1.TINY_SD1
    with pytest.raises(ValueError):
        sd1.SD1Config.from_json('{"model_channels": 32}')


def test_alphas_cumprod() -> None:
    ac = sd1.sd1_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    sigma_max = ((1 - ac[-1]) / ac[-1]).sqrt().item()
    assert sigma_max == pytest.approx(14.6146, abs=1e-3)  # SD1 samplers' sigma_max
    assert bool((ac[1:] < ac[:-1]).all())


# -------------------------------------------------------------------------------------- determinism


def test_tiny_is_deterministic_and_leaves_global_rng(tiny: sd1.SD1Model) -> None:
    before = torch.get_rng_state()
    again = sd1.build_tiny_sd1(0)
    assert torch.equal(before, torch.get_rng_state())
    for part, other in ((tiny.unet, again.unet), (tiny.text_encoder, again.text_encoder)):
        a, b = part.state_dict(), other.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    different = sd1.build_tiny_sd1(1)
    a, b = tiny.unet.state_dict(), different.unet.state_dict()
    assert not torch.equal(a["out.2.weight"], b["out.2.weight"])


def test_tiny_is_identical_across_processes(tiny: sd1.SD1Model) -> None:
    code = (
        "import hashlib; from lib_mos.models import sd1; m = sd1.build_tiny_sd1(0); d = hashlib.sha256()\n"
        "for part in (m.unet, m.text_encoder):\n"
        "    for k, v in part.state_dict().items(): d.update(k.encode()); d.update(v.contiguous().numpy().tobytes())\n"
        "print(d.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == _state_digest(tiny)


def test_no_zero_initialised_parameters(tiny: sd1.SD1Model) -> None:
    for part in (tiny.unet, tiny.text_encoder):
        for name, param in part.named_parameters():
            assert param.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------- forward


def test_tiny_unet_forward_depends_on_context(tiny: sd1.SD1Model) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 77, 32, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        out = tiny.unet(x, t, context=ctx)
        out2 = tiny.unet(x, t, context=ctx + 0.1 * torch.randn(ctx.shape, generator=gen))
        name, attn = attn2_modules(tiny.unet)[-1]
        saved = attn.to_out[0].weight.clone()
        attn.to_out[0].weight.mul_(2.0)
        try:
            out3 = tiny.unet(x, t, context=ctx)
        finally:
            attn.to_out[0].weight.copy_(saved)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    assert (out - out2).abs().max() > 1e-3
    assert (out - out3).abs().max() > 1e-3, f"{name} has no visible effect"


def test_tiny_text_encoder_forward(tiny: sd1.SD1Model) -> None:
    assert tiny.tokenizer is not None
    ids = tiny.tokenizer(
        ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = tiny.text_encoder(ids).last_hidden_state
    assert hidden.shape == (1, 77, 32) and bool(torch.isfinite(hidden).all())


# ------------------------------------------------------------------------------------- checkpoint IO


def test_checkpoint_round_trip(tiny: sd1.SD1Model, tmp_path: Path) -> None:
    path = sd1.save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()[sd1.CONFIG_METADATA_KEY] == sd1.TINY_SD1.to_json()
    assert "alphas_cumprod" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert not any(k.endswith("position_ids") for k in keys)

    loaded = sd1.load_checkpoint(path)
    assert loaded.config == tiny.config
    assert torch.equal(loaded.alphas_cumprod, tiny.alphas_cumprod)
    assert loaded.tokenizer is not None and loaded.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert _state_digest(loaded) == _state_digest(tiny)
    assert not loaded.unet.training
    assert _no_temp_files(tmp_path)


def test_checkpoint_refuses_overwrite(tiny: sd1.SD1Model, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    sd1.save_checkpoint(tiny, path, dtype=torch.float16)
    with pytest.raises(FileExistsError, match=r"tiny\.safetensors"):
        sd1.save_checkpoint(tiny, path)
    sd1.save_checkpoint(tiny, path, overwrite=True)
    assert load_file(str(path))["model.diffusion_model.out.2.weight"].dtype == torch.float32
    assert _no_temp_files(tmp_path)


def test_atomic_save_cleans_up_on_error(tmp_path: Path) -> None:
    shared = torch.zeros(4)
    target = tmp_path / "bad.safetensors"
    with pytest.raises(RuntimeError):
        atomic_save_safetensors({"a": shared, "b": shared}, target)  # safetensors rejects shared storage
    assert list(tmp_path.iterdir()) == []


def _rewrite(src: Path, dst: Path, edit: Edit) -> Path:
    """Copy a checkpoint through `edit` (tensors, metadata) with plain safetensors."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata()
    tensors, metadata = edit(tensors, dict(metadata or {}))
    save_file(tensors, str(dst), metadata=metadata or None)
    return dst


def test_load_rejects_missing_and_misshaped_keys(tiny: sd1.SD1Model, tmp_path: Path) -> None:
    good = sd1.save_checkpoint(tiny, tmp_path / "good.safetensors")
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"

    def drop(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        del t[key]
        return t, m

    def reshape(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        t[key] = torch.zeros(3, 3)
        return t, m

    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        sd1.load_checkpoint(_rewrite(good, tmp_path / "missing.safetensors", drop))
    assert "missing.safetensors" in str(err.value)
    with pytest.raises(ValueError, match="shape"):
        sd1.load_checkpoint(_rewrite(good, tmp_path / "shape.safetensors", reshape))


def test_load_ignores_extra_keys_and_rejects_other_families(tiny: sd1.SD1Model, tmp_path: Path) -> None:
    good = sd1.save_checkpoint(tiny, tmp_path / "good.safetensors")

    def add_vae(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        t["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
        t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
        return t, m

    loaded = sd1.load_checkpoint(_rewrite(good, tmp_path / "vae.safetensors", add_vae))
    assert torch.equal(loaded.text_encoder.text_model.embeddings.position_ids[0], torch.arange(77))

    def sdxl(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        t["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.zeros(2)
        return t, m

    with pytest.raises(ValueError, match="SDXL"):
        sd1.load_checkpoint(_rewrite(good, tmp_path / "xl.safetensors", sdxl))

    vae_only = tmp_path / "vae_only.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, str(vae_only))
    with pytest.raises(ValueError, match=r"vae_only\.safetensors.*model\.diffusion_model"):
        sd1.load_checkpoint(vae_only)


def test_load_infers_config_without_metadata(tmp_path: Path) -> None:
    cfg = sd1.SD1Config(model_channels=32, context_dim=64, text_layers=2, text_heads=1, text_intermediate=96)
    model = sd1.SD1Model(
        unet=sd1.build_unet(cfg),
        text_encoder=sd1.build_text_encoder(cfg),
        tokenizer=None,
        alphas_cumprod=sd1.sd1_alphas_cumprod(),
        config=cfg,
    )
    saved = sd1.save_checkpoint(model, tmp_path / "meta.safetensors")

    def strip(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        # also use the pre-`text_model.` key layout of old checkpoints
        prefix = "cond_stage_model.transformer.text_model."
        t = {
            ("cond_stage_model.transformer." + k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in t.items()
        }
        return t, {}

    loaded = sd1.load_checkpoint(_rewrite(saved, tmp_path / "plain.safetensors", strip))
    assert loaded.config == cfg
    a, b = model.text_encoder.state_dict(), loaded.text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def strip_tiny(t: Tensors, m: Meta) -> tuple[Tensors, Meta]:
        return t, {}

    tiny_plain = sd1.save_checkpoint(sd1.build_tiny_sd1(0), tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        sd1.load_checkpoint(_rewrite(tiny_plain, tmp_path / "tiny_plain.safetensors", strip_tiny))
