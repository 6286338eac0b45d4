"""The trainer's image codecs: the SD1 VAE read from checkpoints, and the linear preview codec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from safetensors.torch import save_file

from lib_mos.models import sampling, vae
from lib_mos.models.vae import SCALE_FACTOR

CH = 32  # the smallest width ldm's 32-group GroupNorm allows
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def state() -> Tensors:
    return vae.random_vae_state(seed=3, ch=CH)


@pytest.fixture(scope="module")
def loaded(state: Tensors) -> vae.LdmVae:
    model = vae.LdmVae(CH)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def _checkpoint_with_vae(tmp_path: Path, state: Tensors, name: str = "with-vae.safetensors") -> Path:
    """A host-layout file: VAE under first_stage_model. beside (a stand-in for) the UNet keys."""
    tensors = {vae.VAE_PREFIX + k: v for k, v in state.items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(CH, 4, 3, 3)
    tensors["first_stage_model.loss.logvar"] = torch.zeros(())  # training leftover: ignored
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------ reading


def test_sd15_layout() -> None:
    """At ch=128 the module has exactly SD1.5's 248 first_stage_model tensors and their shapes."""
    sd = vae.LdmVae(128, device="meta").state_dict()
    assert len(sd) == 248
    assert list(sd["encoder.conv_in.weight"].shape) == [128, 3, 3, 3]
    assert list(sd["encoder.conv_out.weight"].shape) == [8, 512, 3, 3]
    assert list(sd["quant_conv.weight"].shape) == [8, 8, 1, 1]
    assert list(sd["post_quant_conv.weight"].shape) == [4, 4, 1, 1]
    assert list(sd["decoder.mid.attn_1.q.weight"].shape) == [512, 512, 1, 1]
    assert list(sd["decoder.conv_out.weight"].shape) == [3, 128, 3, 3]


def test_read_from_checkpoint_and_standalone(tmp_path: Path, state: Tensors) -> None:
    ckpt = _checkpoint_with_vae(tmp_path, state)
    standalone = tmp_path / "vae.safetensors"
    save_file({**{k: v.half() for k, v in state.items()}, "model_ema.decay": torch.ones(())}, str(standalone))

    from_ckpt = vae.read_vae(ckpt)
    assert from_ckpt.ch == CH and not from_ckpt.training
    assert all(not p.requires_grad for p in from_ckpt.parameters())
    for key, value in from_ckpt.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[key]), key

    from_file = vae.read_vae(standalone, dtype=torch.float16)
    assert from_file.dtype == torch.float16
    for key, value in from_file.state_dict().items():
        assert torch.equal(value, state[key].half()), key


def _expect_error(tmp_path: Path, tensors: Tensors, *needles: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as info:
        vae.read_vae(path)
    for needle in (str(path), *needles):
        assert needle in str(info.value)


def test_strict_errors_name_file_and_key(tmp_path: Path, state: Tensors) -> None:
    prefixed = {vae.VAE_PREFIX + k: v for k, v in state.items()}
    missing = dict(prefixed)
    del missing["first_stage_model.decoder.mid.attn_1.k.weight"]
    _expect_error(tmp_path, missing, "missing", "'first_stage_model.decoder.mid.attn_1.k.weight'")

    extra = {**prefixed, "first_stage_model.decoder.extra.weight": torch.zeros(1)}
    _expect_error(tmp_path, extra, "unexpected", "'first_stage_model.decoder.extra.weight'")

    shaped = {**state, "post_quant_conv.weight": torch.zeros(4, 4)}
    _expect_error(tmp_path, shaped, "'post_quant_conv.weight'", "[4, 4]", "[4, 4, 1, 1]")

    odd_width = {**state, "encoder.conv_in.weight": torch.zeros(40, 3, 3, 3)}
    _expect_error(tmp_path, odd_width, "'encoder.conv_in.weight'", "[40, 3, 3, 3]")

    _expect_error(tmp_path, {"model.diffusion_model.x": torch.zeros(1)}, "no VAE tensors")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        vae.read_vae(tmp_path / "nope.safetensors")
    pickle = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(ValueError, match=r"not a readable \.safetensors file"):
        vae.read_vae(pickle)


def test_random_state_is_deterministic() -> None:
    a, b, c = vae.random_vae_state(7), vae.random_vae_state(7), vae.random_vae_state(8)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])
    # ldm zero-initialises nothing we rely on, but no tensor may be all zeros either
    assert all(bool(v.any()) for v in a.values())


# ------------------------------------------------------------------------------------ encode/decode


def test_encode_matches_ldm_posterior(loaded: vae.LdmVae) -> None:
    """Against ldm's own DiagonalGaussianDistribution: catches a lost scale or swapped mean/logvar."""
    pixels = _pixels()
    with torch.no_grad():
        mean, std = loaded.encode(pixels)
        dist = DiagonalGaussianDistribution(loaded.quant_conv(loaded.encoder(pixels)))
    assert mean.shape == std.shape == (2, 4, 4, 4)
    torch.testing.assert_close(mean, dist.mean * SCALE_FACTOR)
    torch.testing.assert_close(std, dist.std * SCALE_FACTOR)
    assert bool((std > 0).all())
    assert not torch.allclose(mean, dist.mean, atol=1e-3)  # the scale actually matters here


def test_logvar_is_clamped_like_ldm(state: Tensors) -> None:
    """Extreme log-variances are clamped to [-30, 20] before the std is taken, as ldm does."""
    model = vae.LdmVae(CH)
    model.load_state_dict(state)
    with torch.no_grad():
        model.quant_conv.weight[4:] = 0  # logvar channels = bias only
        model.quant_conv.bias[4:] = torch.tensor([100.0, -100.0, 0.0, 25.0])
        _, std = model.encode(_pixels(batch=1, size=8))
    want = torch.tensor([20.0, -30.0, 0.0, 20.0]).mul(0.5).exp() * SCALE_FACTOR
    torch.testing.assert_close(std[0, :, 0, 0], want)


def test_decode_matches_ldm_decoder(loaded: vae.LdmVae) -> None:
    latents = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = loaded.decode(latents)
        ref = loaded.decoder(loaded.post_quant_conv(latents / SCALE_FACTOR)).clamp(-1, 1)
    assert out.shape == (2, 3, 24, 40)
    torch.testing.assert_close(out, ref)
    assert float(out.min()) >= -1 and float(out.max()) <= 1


def test_shape_errors(loaded: vae.LdmVae) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        loaded.encode(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.PreviewEncoder()(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        vae.ImageDecoder(loaded)(torch.zeros(1, 3, 2, 2))


def test_image_encoder_follows_vae(loaded: vae.LdmVae) -> None:
    """float32 out on the input's device whatever the VAE's dtype; grads never recorded."""
    pixels = _pixels(batch=1, size=16).requires_grad_(True)
    mean, std = vae.ImageEncoder(loaded)(pixels)
    assert mean.dtype == std.dtype == torch.float32 and not mean.requires_grad
    half = vae.LdmVae(CH).to(torch.bfloat16)
    half.load_state_dict(loaded.state_dict())
    mean_h, std_h = vae.ImageEncoder(half)(pixels)
    assert mean_h.dtype == std_h.dtype == torch.float32 and mean_h.shape == (1, 4, 2, 2)
    torch.testing.assert_close(mean_h, mean, atol=0.05, rtol=0.05)


def test_image_decoder_gives_rgb_images(loaded: vae.LdmVae) -> None:
    latents = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(2))
    images = vae.ImageDecoder(loaded)(latents)
    assert [(im.mode, im.size) for im in images] == [("RGB", (24, 16))] * 2
    with torch.no_grad():
        ref = loaded.decode(latents[1:])[0]
    expected = ((ref + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(images[1]), expected)


# ----------------------------------------------------------------------------------- preview codec


def test_preview_round_trip_reproduces_downsampled_image() -> None:
    """decode(encode(x)) is x averaged over 8x8 cells, shown at full size (a smooth ramp and a
    solid patch, so pooling by subsampling instead of averaging would show)."""
    ramp = torch.linspace(-0.8, 0.8, 24)
    pixels = torch.stack([ramp.expand(16, 24), -0.5 * ramp.expand(16, 24), torch.full((16, 24), 0.1)])[None]
    pixels[:, :, :8, :8] = torch.tensor([-0.5, 0.4, 0.9]).view(1, 3, 1, 1)
    mean, std = vae.PreviewEncoder()(pixels)
    assert mean.shape == (1, 4, 2, 3) and mean.dtype == torch.float32
    assert torch.equal(std, torch.zeros_like(mean))
    image = np.asarray(vae.PreviewDecoder()(mean)[0]).astype(np.float64)
    assert image.shape == (16, 24, 3)
    cells = torch.nn.functional.avg_pool2d(pixels, 8)
    expected = (cells.repeat_interleave(8, -1).repeat_interleave(8, -2)[0].permute(1, 2, 0).numpy() + 1) / 2 * 255
    assert np.abs(image - expected).max() <= 1.0
    assert np.abs(image - (pixels[0].permute(1, 2, 0).numpy() + 1) / 2 * 255).max() < 40  # roughly x itself
    # and the latents are what the sampler's preview inverts
    torch.testing.assert_close(torch.einsum("bchw,cr->brhw", mean, sampling.LATENT_RGB), cells, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- image_codec


def test_image_codec_picks_vae_or_preview(tmp_path: Path, state: Tensors, tiny_checkpoint: Path) -> None:
    encoder, decoder, description = vae.image_codec(tiny_checkpoint)
    assert isinstance(encoder, vae.PreviewEncoder) and isinstance(decoder, vae.PreviewDecoder)
    assert "linear preview codec" in description and tiny_checkpoint.name in description

    ckpt = _checkpoint_with_vae(tmp_path, state)
    encoder, decoder, description = vae.image_codec(ckpt)
    assert isinstance(encoder, vae.ImageEncoder) and isinstance(decoder, vae.ImageDecoder)
    assert description == f"VAE from {ckpt.name}"
    mean, _ = encoder(_pixels(batch=1, size=16))
    assert mean.shape == (1, 4, 2, 2)

    standalone = tmp_path / "other-vae.safetensors"
    save_file(state, str(standalone))
    encoder, _, description = vae.image_codec(tiny_checkpoint, vae=standalone)
    assert isinstance(encoder, vae.ImageEncoder) and description == "VAE from other-vae.safetensors"


def test_builds_plain_attention_quietly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Even where ldm found xformers (whose attention block fails on CPU) the VAE gets plain-torch
    attention, the flag is restored, and ldm's construction prints stay off stdout."""
    import ldm.modules.diffusionmodules.model as ldm_model

    monkeypatch.setattr(ldm_model, "XFORMERS_IS_AVAILBLE", True)
    model = vae.LdmVae(CH)
    assert type(model.encoder.mid.attn_1) is ldm_model.AttnBlock
    assert type(model.decoder.mid.attn_1) is ldm_model.AttnBlock
    assert ldm_model.XFORMERS_IS_AVAILBLE is True
    assert capsys.readouterr().out == ""


def test_the_sdxl_latent_scale_comes_from_the_family(state: Tensors, tmp_path) -> None:
    """An SDXL checkpoint's VAE has SD1's shape but another latent scale (0.13025): the codec built
    with the family's scale encodes and decodes in that UNet's space."""
    from lib_mos.models.family import SD1, SDXL

    path = _checkpoint_with_vae(tmp_path, state)
    pixels = _pixels()
    with torch.no_grad():
        sd_mean, _ = vae.read_vae(path, scale=SD1.latent_scale).encode(pixels)
        xl = vae.read_vae(path, scale=SDXL.latent_scale)
        xl_mean, _ = xl.encode(pixels)
        torch.testing.assert_close(xl_mean, sd_mean / 0.18215 * 0.13025)
        torch.testing.assert_close(xl.decode(xl_mean), vae.read_vae(path).decode(sd_mean))
