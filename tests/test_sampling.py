"""lib_mos's own sampler (used outside the host) reproduces the host's Euler sampling, and the
demo runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from lib_mos.concepts import binding
from lib_mos.models import sampling, sd1
from lib_mos.models.family import attn2_modules

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
    assert written == ["concepts/cat1-edlora-main.pth", "concepts/cat1.safetensors", "concepts/disc.safetensors",
                       "concepts/dog1-edlora-research_branch.pth", "concepts/dog1.safetensors",
                       "concepts/ohwx-corgi-locon.safetensors", "concepts/ohwx-corgi.safetensors",
                       "concepts/sks-vase-loha.safetensors", "concepts/sks-vase.safetensors",
                       "fused-cat-and-dog.png", "fused-cat-dog-disc.safetensors", "fused-mixed.png",
                       "fused-mixed.safetensors", "regional-cat-left-dog-right.png", "tiny-sd1.safetensors",
                       "toyworld-composition.png", "toyworld-fused-rings-frame-zebra.safetensors",
                       "toyworld-region-loras.png",
                       *[f"training-images/disc{k}.{ext}" for k in range(4) for ext in ("png", "txt")],
                       "txt2img-a-photo-of-a-cat.png", "txt2img-a-photo-of-a-dog.png"]
    for name in written:
        assert str(out / name) in proc.stdout
    # the closing summary: every file under out, each with what to look at (training captions too)
    summary = proc.stdout.split(f"what to look at (all under {out}/):\n", 1)[1].split("\ntime per step", 1)[0]
    listed = [line.strip().split(": ", 1) for line in summary.splitlines()]
    assert sorted(name for name, _ in listed) == written and all(look for _, look in listed), summary
    assert "toyworld-composition.png: top row: orange-and-white rings (left)" in summary
    assert "--- 7. toy world" in proc.stdout and "s CPU" in proc.stdout  # each step's time
    assert "demo (quick;" in proc.stdout and "demo-full" in proc.stdout  # make demo is the quick one
    assert "gradient fusion report" in proc.stdout and "trained concept <disc1> <disc2>: 16 steps" in proc.stdout
    loaded = sd1.load_checkpoint(out / "tiny-sd1.safetensors")
    assert len(attn2_modules(loaded.unet)) == 16
    _check_mixed_set(out, proc.stdout, loaded)
    # the toy world: a composition a person can judge (reference row + the quick demo's samples, a
    # white line between rows, 3 regions wide, upscaled 4x)
    from PIL import Image

    from lib_mos.cli.demo import QUICK

    rows = 1 + QUICK.toy_samples
    for name in ("toyworld-composition.png", "toyworld-region-loras.png"):
        assert Image.open(out / name).size == (3 * 32 * 4, (rows * 32 + rows - 1) * 4)
    assert "toy world fidelity" in proc.stdout and "2 concept(s), fused" in proc.stdout
    assert "2 concept(s), region_loras" in proc.stdout


def _check_mixed_set(out: Path, stdout: str, base: sd1.SD1Model) -> None:
    """The demo's mixed set: trigger words found in the kohya and LyCORIS files, all four concepts
    fused in every stage, the LoCon's and LoHa's convs and text-encoder MLPs changed."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from lib_mos.concepts.concept import LoraFactor, ModuleDelta
    from lib_mos.concepts.files import read_concept
    from lib_mos.fusion.checkpoint import FUSED_METADATA_KEY

    for stem, words, kinds in (("ohwx-corgi-locon", "ohwx corgi", {"lora"}), ("sks-vase-loha", "sks vase", {"loha"})):
        path = out / "concepts" / f"{stem}.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert "mos_concept" not in meta and not any(k.startswith("mos_concept") for k in load_file(str(path)))
        assert any(words in tags for tags in json.loads(meta["ss_tag_frequency"]).values())  # a trainer's file
        concept = read_concept(out / "concepts" / f"{stem}.safetensors")
        assert concept.tokens == () and concept.triggers == (words,), concept.triggers
        assert "ss_tag_frequency" in concept.trigger_source
        assert f"trigger word {words!r}: most frequent training tag" in stdout
        assert {f.kind for f in concept.unet_lora.values() if isinstance(f, ModuleDelta)} == kinds
        convs = [n for n, f in concept.unet_lora.items() if "in_layers.2" in n or "out_layers.3" in n]
        assert convs and any(n.endswith("mlp.fc1") for n in concept.text_lora)
        if kinds == {"lora"}:
            assert any(isinstance(f, LoraFactor) for f in concept.unet_lora.values())
    assert "mixed set (2 ED-LoRA concepts with tokens, a LoCon and a LoHa with trigger words)" in stdout

    with safe_open(str(out / "fused-mixed.safetensors"), "pt") as f:
        info = json.loads(f.metadata()[FUSED_METADATA_KEY])
    fused = load_file(str(out / "fused-mixed.safetensors"))
    assert [c["name"] for c in info["concepts"]] == ["cat1", "dog1", "ohwx-corgi", "sks-vase"]
    assert [c["triggers"] for c in info["concepts"]][2:] == [["ohwx corgi"], ["sks vase"]]
    rows = {(r["concept"], r["stage"]): r for r in info["report"]}
    assert set(rows) == {(c, s) for c in ("cat1", "dog1", "ohwx-corgi", "sks-vase")
                         for s in ("te", "kv", "spatial", "picture")}  # picture: the verdict's check
    for concept in ("ohwx-corgi", "sks-vase"):
        for stage in ("te", "spatial"):
            row = rows[(concept, stage)]
            for key in ("held_out", "held_out_average", "held_out_stacked"):
                assert isinstance(row[key], float), (concept, stage, key, row[key])
        assert f"{concept}: what it draws, error against its own model" in stdout
    assert rows[("cat1", "spatial")]["layers"] > 96  # the ED-LoRA attention layers and the LoRAs' others
    # the layers only the LoCon / LoHa change moved: resnet 3x3 convs, proj_in, feed-forward, text MLP
    for key, module in (("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.in_layers.2"),
                        ("model.diffusion_model.middle_block.2.out_layers.3.weight", "middle_block.2.out_layers.3"),
                        ("model.diffusion_model.output_blocks.11.1.proj_in.weight", "output_blocks.11.1.proj_in"),
                        ("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight",
                         "middle_block.1.transformer_blocks.0.ff.net.2")):
        assert not torch.equal(fused[key], base.unet.get_submodule(module).weight.data), key
    for layer in ("text_model.encoder.layers.11.mlp.fc1", "text_model.encoder.layers.0.mlp.fc2"):
        key = f"cond_stage_model.transformer.{layer}.weight"
        assert not torch.equal(fused[key], base.text_encoder.get_submodule(layer).weight.data), key


def test_regional_sampling_whole_image_region_equals_its_prompt_alone():
    from lib_mos.regional.attention import RegionalContext
    from lib_mos.regional.regions import Region, RegionSpec, layer_masks

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
    assert all("forward" not in m.__dict__ for _, m in attn2_modules(model.unet))
