"""lib_mos's own sampler (used outside the host) reproduces the host's Euler sampling, and the
demo runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lib_mos import binding, sampling, sd1

ROOT = Path(__file__).resolve().parents[1]


def test_plain_encoding_matches_the_host(host):
    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    ours = binding.encode_prompts(model, ["a photo of a cat", ""])
    with torch.no_grad():
        theirs = host.model.get_learned_conditioning(["a photo of a cat", ""])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sampler_matches_host_euler(host):
    model = sd1.load_checkpoint(host.model.sd_checkpoint_info.filename)
    prompts, negative = ["a photo of a cat", "a dog"], "blurry"
    res = host.txt2img(prompts, negative, batch_size=2, seed=11, steps=5, cfg_scale=7.5, width=64, height=80)
    cond = binding.encode_prompts(model, prompts)
    uncond = binding.encode_prompts(model, [negative] * 2)
    ours = sampling.sample_euler(model, cond, uncond, seeds=[11, 12], height=80, width=64, steps=5, cfg_scale=7.5)
    theirs = torch.stack([im.latent for im in res.images])
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_sampler_is_deterministic_per_seed():
    model = sd1.build_tiny_sd1(0)
    cond = binding.encode_prompts(model, ["a", "b"])
    a = sampling.sample_euler(model, cond, None, seeds=[1, 2], height=64, width=64, steps=2)
    b = sampling.sample_euler(model, cond[1:], None, seeds=[2], height=64, width=64, steps=2)
    torch.testing.assert_close(a[1:], b, rtol=1e-3, atol=1e-3)  # no dependence on batch neighbours


def test_prompt_longer_than_one_chunk_is_refused():
    model = sd1.build_tiny_sd1(0)
    try:
        binding.tokenize(model, ["cat " * 80])
    except ValueError as e:
        assert "more than 75" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_demo_runs_and_says_what_it_wrote(tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on 2 cores
    proc = subprocess.run([sys.executable, "-m", "lib_mos", "demo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["concepts/cat1-edlora-main.pth", "concepts/cat1.safetensors",
                       "concepts/dog1-edlora-research_branch.pth", "concepts/dog1.safetensors",
                       "fused-cat-and-dog.png", "fused-cat-dog.safetensors", "regional-cat-left-dog-right.png",
                       "tiny-sd1.safetensors",
                       "txt2img-a-photo-of-a-cat.png", "txt2img-a-photo-of-a-dog.png"]
    for name in written:
        assert str(out / name) in proc.stdout
    assert "gradient fusion report" in proc.stdout
    loaded = sd1.load_checkpoint(out / "tiny-sd1.safetensors")
    assert len(sd1.attn2_modules(loaded.unet)) == 16


def test_regional_sampling_whole_image_region_equals_its_prompt_alone():
    from lib_mos.attention import RegionalContext
    from lib_mos.regions import Region, RegionSpec, layer_masks

    model = sd1.build_tiny_sd1(0)
    spec = RegionSpec(regions=(Region("a dog", negative="dark", box=(0.0, 0.0, 1.0, 1.0), units="fraction"),))
    cond, uncond = binding.encode_prompts(model, ["a cat"]), binding.encode_prompts(model, ["blurry"])
    region_rows = torch.stack([binding.encode_prompts(model, ["a dog"]), binding.encode_prompts(model, ["dark"])])
    processor = RegionalContext()
    processor.set_rows(region_rows, layer_masks(spec, 64, 64))  # [2 rows, 1 region, 77, D]
    kwargs = dict(seeds=[3], height=64, width=64, steps=3, cfg_scale=7.5)
    regional = sampling.sample_euler(model, cond, uncond, processor=processor, **kwargs)
    alone = sampling.sample_euler(model, binding.encode_prompts(model, ["a dog"]),
                                  binding.encode_prompts(model, ["dark"]), **kwargs)
    torch.testing.assert_close(regional, alone, rtol=1e-3, atol=1e-3)  # SDPA vs ldm einsum, CFG 7.5
    assert all("forward" not in m.__dict__ for _, m in sd1.attn2_modules(model.unet))
