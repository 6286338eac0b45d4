"""Gradient fusion end to end on the tiny model: better than weight averaging for every concept,
the live model untouched, interrupts and bad inputs leave nothing behind, and the fused checkpoint
loads in the host with its tokens bindable."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_binding import make_concept, snapshot

from lib_mos import binding, fusion, sd1
from lib_mos.concepts import ConceptError

FAST = fusion.FusionSettings(spatial_steps=2, spatial_size=64, seed=0)


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


@pytest.fixture(scope="module")
def inputs(tiny) -> list[fusion.FusionInput]:
    a = dataclasses.replace(make_concept(tiny, ("<cat1>", "<cat2>"), seed=1), name="cat", source_sha256="a" * 64)
    b = dataclasses.replace(make_concept(tiny, ("<dog1>", "<dog2>"), seed=2), name="dog", source_sha256="b" * 64)
    return [fusion.FusionInput(a), fusion.FusionInput(b, unet_weight=0.8, text_weight=0.9)]


@pytest.fixture(scope="module")
def fused(tiny, inputs) -> fusion.FusionResult:
    before = snapshot(tiny)
    result = fusion.fuse(tiny, inputs, FAST)
    after = snapshot(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before), "fusion changed the live model"
    return result


def test_every_stage_beats_weight_averaging(fused):
    stages = {r["stage"] for r in fused.report}
    assert stages == {"te", "kv", "spatial"}
    assert len(fused.report) == 6
    for row in fused.report:
        assert row["fused"] < row["average"], row
    assert len(fused.text_weights) == 48 and len(fused.unet_weights) == 128


def test_fused_weights_differ_from_base_and_are_finite(tiny, fused):
    for name, w in fused.unet_weights.items():
        assert torch.isfinite(w).all()
        assert not torch.equal(w, tiny.unet.get_submodule(name).weight)


def test_concept_weights_scale_what_fusion_reproduces(tiny, inputs):
    """One concept alone: the exact solve is linear in its targets W0 + w * delta, so where the
    recorded inputs do not depend on the weight (the text encoder's first layer; k/v with the text
    encoder stage skipped), halving the weight halves the fused change."""
    concept = inputs[0].concept

    def fused(skip: set[str], **weights) -> dict[str, torch.Tensor]:
        result = fusion.fuse(tiny, [fusion.FusionInput(concept, **weights)], dataclasses.replace(FAST, skip=frozenset(skip)))
        return {**result.text_weights, **result.unet_weights}

    te_full, te_half = (fused({"kv", "spatial"}, text_weight=w) for w in (1.0, 0.5))
    kv_full, kv_half = (fused({"te", "spatial"}, unet_weight=w) for w in (1.0, 0.5))
    first_layer = [n for n in te_full if n.startswith("text_model.encoder.layers.0.") and not n.endswith("out_proj")]
    checks = [(n, tiny.text_encoder, te_full, te_half) for n in first_layer]
    checks += [(n, tiny.unet, kv_full, kv_half) for n in kv_full]
    assert len(first_layer) == 3 and len(kv_full) == 32
    for name, root, full, half in checks:
        base = root.get_submodule(name).weight
        assert not torch.allclose(full[name], base)
        torch.testing.assert_close(half[name] - base, 0.5 * (full[name] - base), rtol=1e-3, atol=1e-6)


def test_skipping_stages(tiny, inputs):
    result = fusion.fuse(tiny, inputs, dataclasses.replace(FAST, skip=frozenset({"te", "spatial"})))
    assert not result.text_weights and {r["stage"] for r in result.report} == {"kv"}
    assert all(n.endswith(("to_k", "to_v")) for n in result.unet_weights)


def test_interrupt_restores_the_model(tiny, inputs):
    before = snapshot(tiny)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(fusion.FusionInterrupted):
        fusion.fuse(tiny, inputs, FAST, should_stop=should_stop)
    assert all(torch.equal(before[k], v) for k, v in snapshot(tiny).items())


def test_bad_inputs(tiny, inputs):
    with pytest.raises(ConceptError, match="no concepts"):
        fusion.fuse(tiny, [], FAST)
    with pytest.raises(ConceptError, match="listed twice"):
        fusion.fuse(tiny, [inputs[0], inputs[0]], FAST)
    clash = dataclasses.replace(inputs[1].concept, tokens=("<cat1>", "<x>"), source_sha256="c" * 64)
    with pytest.raises(ConceptError, match="<cat1>"):
        fusion.fuse(tiny, [inputs[0], fusion.FusionInput(clash)], FAST)
    with pytest.raises(ValueError, match="unknown stage"):
        fusion.FusionSettings(skip=frozenset({"vae"}))


def test_fused_checkpoint_round_trip(tmp_path, tiny, inputs, fused):
    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    base = fusion.read_base_state_dict(base_path)
    sd = fusion.fused_state_dict(base, fused, dtype=torch.float16)
    out = fusion.write_fused_checkpoint(sd, tmp_path / "fused.safetensors",
                                        fusion.fused_metadata(inputs, FAST, fused, {"lib_mos.sd1_config":
                                                                                     tiny.config.to_json()}))
    loaded = sd1.load_checkpoint(out)
    name = sd1.unet_attention_linear_names()[3]
    assert torch.equal(loaded.unet.get_submodule(name).weight, fused.unet_weights[name].half().float())
    concepts = fusion.read_fused_concepts(out)  # the rows stay float32 in an fp16 checkpoint
    assert [c.tokens for c in concepts] == [("<cat1>", "<cat2>"), ("<dog1>", "<dog2>")]
    assert torch.equal(concepts[0].embeddings, inputs[0].concept.embeddings)
    z = binding.PromptBinder(loaded, concepts).encode(["a photo of <dog1> <dog2>"])
    assert z.shape == (1, 16, 77, 32)


def test_fused_checkpoint_loads_in_the_host_and_tokens_bind(tmp_path, tiny, inputs, fused):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import mos_host_binding
    from host_harness import HostHarness

    from modules.sd_hijack import model_hijack

    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    sd = fusion.fused_state_dict(fusion.read_base_state_dict(base_path), fused)  # fp16 as shipped
    ckpt = fusion.write_fused_checkpoint(sd, tmp_path / "fused-cat-dog.safetensors",
                                         fusion.fused_metadata(inputs, FAST, fused,
                                                               {"lib_mos.sd1_config": tiny.config.to_json()}))
    host = HostHarness(tmp_path / "root", ckpt)
    try:
        live = host.model.model.diffusion_model.get_submodule(sd1.unet_attention_linear_names()[0]).weight
        assert torch.equal(live, fused.unet_weights[sd1.unet_attention_linear_names()[0]].half().float())
        concepts = fusion.read_fused_concepts(host.model.sd_checkpoint_info.filename)
        model = sd1.load_checkpoint(ckpt)
        binder = binding.PromptBinder(model, concepts)
        z = mos_host_binding.encode_bound(host.model, model_hijack.embedding_db, binder, ["<cat1> <cat2> and <dog1>"])
        assert z.shape == (1, 16, 77, 32) and not torch.allclose(z[0, 0], z[0, 15])
        res = host.txt2img("a photo of a cat", steps=2)
        assert res.images
    finally:
        host.close()


def test_writing_is_atomic_and_refuses_overwrite(tmp_path, tiny, inputs, fused):
    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    sd = fusion.fused_state_dict(fusion.read_base_state_dict(base_path), fused)
    out = fusion.write_fused_checkpoint(sd, tmp_path / "f.safetensors", {})
    with pytest.raises(FileExistsError):
        fusion.write_fused_checkpoint(sd, out, {})
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")  # tests run as root in CI, where permission bits do not stop writes
    with pytest.raises(OSError):
        fusion.write_fused_checkpoint(sd, not_a_folder / "f.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "f.safetensors", "file"]


def test_base_of_another_architecture_is_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                                 torch.zeros(4, 4)}, str(path))
    with pytest.raises(ConceptError, match=r"sdxl\.safetensors"):
        fusion.read_base_state_dict(path)


def _concept_files(tmp_path, inputs) -> list:
    from lib_mos.concept_files import write_concept

    paths = []
    for item in inputs:
        paths.append(write_concept(item.concept, tmp_path / f"{item.concept.name}.safetensors"))
    return paths


def _cli(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on 2 cores
    return subprocess.run([sys.executable, "-m", "lib_mos", *map(str, args)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300, env=env)


def test_cli_fuses_and_prints_the_report(tmp_path, tiny, inputs):
    base = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    cat, dog = _concept_files(tmp_path, inputs)
    out = tmp_path / "fused.safetensors"
    proc = _cli("fuse", "--base", base, "--concept", cat, "--concept", f"{dog}:<pup1>+<pup2>", "--out", out,
                "--spatial-steps", 2, "--spatial-size", 64)
    assert proc.returncode == 0, proc.stderr
    assert "averaged" in proc.stdout and f"wrote {out}" in proc.stdout
    assert [c.tokens for c in fusion.read_fused_concepts(out)] == [("<cat1>", "<cat2>"), ("<pup1>", "<pup2>")]
    again = _cli("fuse", "--base", base, "--concept", cat, "--out", out, "--skip-stage", "spatial")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_cli_bad_inputs_write_nothing(tmp_path, tiny, inputs, capsys):
    import safetensors.torch

    from lib_mos.__main__ import main

    base = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    cat, dog = _concept_files(tmp_path, inputs)
    sdxl = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file({"conditioner.embedders.0.model.x": torch.zeros(2)}, str(sdxl))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cases = [
        (("--base", base, "--concept", cat, "--concept", cat), "listed twice"),
        (("--base", sdxl, "--concept", cat), "sdxl.safetensors"),
        (("--base", base, "--concept", tmp_path / "missing.safetensors"), "missing.safetensors"),
        (("--base", base, "--concept", f"{cat}:<only>"), "new token names"),
        (("--base", base, "--concept", cat, "--concept", f"{dog}:<cat1>+<x>"), "<cat1>"),
    ]
    cases.append((("--base", base, "--concept", cat), "nofolder"))
    for args, message in cases:
        out = tmp_path / "nofolder" / "f.safetensors" if message == "nofolder" else out_dir / "f.safetensors"
        code = main(["fuse", *map(str, args), "--out", str(out), "--skip-stage", "spatial"])
        err = capsys.readouterr().err
        assert code == 1, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(out_dir.iterdir()) == []
