"""Gradient fusion end to end on the tiny model: better than weight averaging for every concept,
the live model untouched, interrupts and bad inputs leave nothing behind, and the fused checkpoint
loads in the host with its tokens bindable."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_binding import make_concept, snapshot

from lib_mos.concepts import binding
from lib_mos.concepts.concept import ConceptError
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion import pipeline as fusion
from lib_mos.fusion import report as fusion_report
from lib_mos.models import sd1

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


def layer_rows(result: fusion.FusionResult) -> list[dict]:
    return [r for r in result.report if r["stage"] != fusion_report.PICTURE]


def test_every_stage_beats_weight_averaging(fused):
    stages = {r["stage"] for r in fused.report}
    assert stages == {"te", "kv", "spatial", fusion_report.PICTURE}
    layers = layer_rows(fused)
    assert len(layers) == 6
    for row in layers:
        assert row["fused"] < row["average"], row
        assert 0 < row["held_out"] < fusion_report.HELD_OUT_BOUND and row["held_out"] != row["fused"], row
        assert row["distance"] > 0 and row["change"] <= fusion_report.DISTANCE_BOUND and not row["flags"], row
    assert len(fused.text_weights) == 48 and len(fused.unet_weights) == 128


def test_report_counts_rows_against_layer_widths(fused):
    """Rows per concept in each stage's least-covered layer: the spatial stage's middle block sees
    one latent cell at 64 px, so steps x seeds rows for the solve and steps rows held out."""
    rows = {(r["concept"], r["stage"]): (r["rows"], r["held_out_rows"], r["width"]) for r in layer_rows(fused)}
    steps, seeds = FAST.spatial_steps, FAST.spatial_seeds
    assert rows["cat", "spatial"] == rows["dog", "spatial"] == (steps * seeds, steps, 128)
    # k/v: 2 prompts x (2 concept tokens + EOS) against the 32-wide context, the same held out
    assert rows["cat", "kv"] == (6, 6, 32)
    # text encoder: 16 layer copies of every token up to the real EOS
    # (the concept slots included): BOS photo of a <1> <2> EOS + BOS <1> <2> EOS, and held out
    # BOS a close - up picture of <1> <2> outdoors EOS + BOS <1> <2> next to a window EOS
    assert rows["cat", "te"] == (16 * (7 + 4), 16 * (11 + 8), 32)
    assert fusion.spatial_shortfall(sd1.TINY_SD1, FAST) in fused.warnings


def test_held_out_inputs_never_enter_the_solve(tiny, inputs, fused):
    """The same fusion without the held-out check gives the same weights (the spatial batch is one
    row shorter, so only float rounding may differ) and a report without held-out errors."""
    plain = fusion.fuse(tiny, inputs, dataclasses.replace(FAST, held_out=False))
    for name, w in {**fused.text_weights, **fused.unet_weights}.items():
        other = plain.text_weights.get(name, plain.unet_weights.get(name))
        torch.testing.assert_close(other, w, rtol=1e-3, atol=1e-5)
    assert all(r["held_out"] is None and r["held_out_rows"] == 0 for r in layer_rows(plain))
    assert [r["fused"] for r in plain.report] == pytest.approx([r["fused"] for r in fused.report], rel=1e-3)


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


def test_one_concept_fuses_to_its_own_weights(tiny, inputs):
    """With a single concept the data and the prior (the weight average) agree everywhere, so the
    fused weights are the concept's own, also off the recorded inputs (k/v: 6 rows for 32 inputs)."""
    item = inputs[1]
    result = fusion.fuse(tiny, [item], dataclasses.replace(FAST, skip=frozenset({"spatial"})))
    for weights, root, lora, w in ((result.text_weights, tiny.text_encoder, item.concept.text_lora, item.text_weight),
                                   (result.unet_weights, tiny.unet, item.concept.unet_lora, item.unet_weight)):
        for name, fused_weight in weights.items():
            expected = root.get_submodule(name).weight + w * lora[name].delta()
            torch.testing.assert_close(fused_weight, expected, rtol=0, atol=1e-6)
    assert len(result.unet_weights) == 32 and all(r["held_out"] < 1e-5 for r in layer_rows(result))


def test_the_picture_check_measures_against_the_concepts_own_model(tiny, inputs):
    """One concept, all stages: averaging and stacking are its own model (error 0), the fused
    weights nearly so; with a stage skipped, fusion loses what that stage's LoRA drew."""
    item = inputs[1]
    full = fusion.fuse(tiny, [item], FAST)
    [row] = [r for r in full.report if r["stage"] == fusion_report.PICTURE]
    assert row["average"] == row["stacked"] == 0.0 and row["fused"] < 0.05, row
    skipped = fusion.fuse(tiny, [item], dataclasses.replace(FAST, skip=frozenset({"spatial"})))
    [row] = [r for r in skipped.report if r["stage"] == fusion_report.PICTURE]
    assert row["average"] == 0.0 and row["fused"] > 0.2, row
    none = fusion.fuse(tiny, [item], dataclasses.replace(FAST, check_steps=0))
    assert fusion_report.PICTURE not in {r["stage"] for r in none.report}


def test_skipping_stages(tiny, inputs):
    result = fusion.fuse(tiny, inputs, dataclasses.replace(FAST, skip=frozenset({"te", "spatial"})))
    assert not result.text_weights and {r["stage"] for r in result.report} == {"kv", fusion_report.PICTURE}
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
    out = fused_checkpoint.write_fused_checkpoint(base_path, fused, tmp_path / "fused.safetensors",
                                                  fused_checkpoint.fused_metadata(inputs, FAST, fused, {
                                                      "lib_mos.sd1_config": tiny.config.to_json()}),
                                                  dtype=torch.float16)
    loaded = sd1.load_checkpoint(out)
    name = sd1.unet_attention_linear_names()[3]
    assert torch.equal(loaded.unet.get_submodule(name).weight, fused.unet_weights[name].half().float())
    concepts = fused_checkpoint.read_fused_concepts(out)  # the rows stay float32 in an fp16 checkpoint
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


    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    ckpt = fused_checkpoint.write_fused_checkpoint(base_path, fused, tmp_path / "fused-cat-dog.safetensors",  # fp16
                                         fused_checkpoint.fused_metadata(inputs, FAST, fused,
                                                               {"lib_mos.sd1_config": tiny.config.to_json()}))
    host = HostHarness(tmp_path / "root", ckpt)
    try:
        live = host.model.model.diffusion_model.get_submodule(sd1.unet_attention_linear_names()[0]).weight
        assert torch.equal(live, fused.unet_weights[sd1.unet_attention_linear_names()[0]].half().float())
        concepts = fused_checkpoint.read_fused_concepts(host.model.sd_checkpoint_info.filename)
        model = sd1.load_checkpoint(ckpt)
        binder = binding.PromptBinder(model, concepts)
        z = mos_host_binding.encode_bound(host.model, binder, ["<cat1> <cat2> and <dog1>"])
        assert z.shape == (1, 16, 77, 32) and not torch.allclose(z[0, 0], z[0, 15])
        res = host.txt2img("a photo of a cat", steps=2)
        assert res.images
    finally:
        host.close()


def test_writing_is_atomic_and_refuses_overwrite(tmp_path, tiny, inputs, fused):
    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    out = fused_checkpoint.write_fused_checkpoint(base_path, fused, tmp_path / "f.safetensors", {})
    with pytest.raises(FileExistsError):
        fused_checkpoint.write_fused_checkpoint(base_path, fused, out, {})
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")  # tests run as root in CI, where permission bits do not stop writes
    with pytest.raises(OSError):
        fused_checkpoint.write_fused_checkpoint(base_path, fused, not_a_folder / "f.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "f.safetensors", "file"]


def test_base_of_another_architecture_is_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "sdxl.safetensors"
    safetensors.torch.save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
                                 torch.zeros(4, 4)}, str(path))
    with pytest.raises(ConceptError, match=r"sdxl\.safetensors"):
        fused_checkpoint.write_fused_checkpoint(path, fusion.FusionResult(), tmp_path / "out.safetensors", {})
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ConceptError, match=r"junk\.safetensors"):
        fused_checkpoint.write_fused_checkpoint(tmp_path / "junk.safetensors", fusion.FusionResult(),
                                                tmp_path / "out.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors", "sdxl.safetensors"]


def _concept_files(tmp_path, inputs) -> list:
    from lib_mos.concepts.files import write_concept

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
    proc = subprocess.run([sys.executable, "-m", "lib_mos", *map(str, args)], capture_output=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300, env=env)
    # decoded by hand: text=True would turn the progress bar's carriage returns into newlines
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_cli_fuses_and_prints_the_report(tmp_path, tiny, inputs):
    base = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    cat, dog = _concept_files(tmp_path, inputs)
    out = tmp_path / "fused.safetensors"
    proc = _cli("fuse", "--base", base, "--concept", cat, "--concept", f"{dog}:<pup1>+<pup2>", "--out", out,
                "--spatial-steps", 2, "--spatial-size", 64)
    assert proc.returncode == 0, proc.stderr
    assert "averaged" in proc.stdout and "held-out" in proc.stdout and f"wrote {out}" in proc.stdout
    assert proc.stdout.count(": what it draws, error against its own model") == 2  # the verdict per concept
    assert "WARNING: spatial: 2 step(s) x 4 seed(s) at 64 px" in proc.stdout  # too few rows for the middle block
    # stderr is a pipe here, not a terminal: per stage and action a first and a last line (and one
    # every 30 s between), not a line or a redraw per layer
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line]
    actions = ["te: recording", "te: solving", "kv: recording", "kv: solving", "spatial: sampling concept 1/2",
               "spatial: sampling concept 2/2", "spatial: solving", "picture: checking"]
    assert list(dict.fromkeys(line.split(" |")[0] for line in lines)) == actions, proc.stderr
    ends = {line.split(" |")[0]: line for line in lines}  # each action's last line
    assert all(line.split("| ")[1].split(" ")[0] in ("2/2", "48/48", "32/32", "96/96") for line in ends.values())
    assert "layer/s" in ends["spatial: solving"] and "transformer_blocks" in ends["spatial: solving"]
    assert len(lines) <= 2 * len(actions) + 4, proc.stderr  # (+4: a slow machine's 30 s lines)
    assert [c.tokens for c in fused_checkpoint.read_fused_concepts(out)] == [("<cat1>", "<cat2>"), ("<pup1>", "<pup2>")]
    again = _cli("fuse", "--base", base, "--concept", cat, "--out", out, "--skip-stage", "spatial")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_cli_bad_inputs_write_nothing(tmp_path, tiny, inputs, capsys):
    import safetensors.torch

    from lib_mos.cli.main import main

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
        (("--base", base, "--concept", cat, "--check-steps", -1), "check steps"),
    ]
    cases.append((("--base", base, "--concept", cat), "nofolder"))
    for args, message in cases:
        out = tmp_path / "nofolder" / "f.safetensors" if message == "nofolder" else out_dir / "f.safetensors"
        code = main(["fuse", *map(str, args), "--out", str(out), "--skip-stage", "spatial"])
        err = capsys.readouterr().err
        assert code == 1, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert list(out_dir.iterdir()) == []


def test_cli_bug_ends_with_one_error_line_after_the_traceback(tmp_path, tiny, inputs, capsys, monkeypatch):
    """What the tab shows is the last `error:` line; the traceback above it is for a bug report."""
    from lib_mos.cli.main import main

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fused_checkpoint, "fuse_checkpoint", broken)
    base = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    cat, _ = _concept_files(tmp_path, inputs)
    code = main(["fuse", "--base", str(base), "--concept", str(cat), "--out", str(tmp_path / "f.safetensors")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines[0].startswith("Traceback")
    assert lines[-1] == f"error: {tmp_path / 'f.safetensors'}: unexpected RuntimeError: boom; nothing was written"


def test_progress_bar_shows_stage_layer_rate_and_eta(monkeypatch):
    import io

    from lib_mos.cli import main as cli

    clock = iter([0.0, 2.0, 4.0, 10.0, 10.5])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    monkeypatch.setenv("COLUMNS", "160")  # the bar fits the terminal: not the one the tests run in
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, width=10, live=True)
    bar("te: solving", 0, 4)  # the stage announces itself: the clock starts
    assert "0/4 [00:00<?, ? layer/s]" in stream.getvalue()
    bar("te: solving: text_model.encoder.layers.0.self_attn.q_proj", 1, 4)
    bar("te: solving: text_model.encoder.layers.0.self_attn.k_proj", 2, 4)
    frames = stream.getvalue().split("\r")
    assert frames[-1].startswith("te: solving |#####.....| 2/4 [00:04<00:04, 0.50 layer/s]")
    assert "layers.0.self_attn.k_proj" in frames[-1] and "\n" not in stream.getvalue()
    bar("te: solving: x", 4, 4)  # done: the line ends
    assert stream.getvalue().endswith("\n") and "4/4 [00:10<00:00, 0.40 layer/s]" in stream.getvalue()
    bar("spatial: sampling concept 1/2", 1, 20)  # a new stage/action starts a new line
    assert stream.getvalue().split("\n")[-1].lstrip("\r").startswith("spatial: sampling concept 1/2 |")
    bar.close()
    assert stream.getvalue().endswith("\n")


def test_progress_in_a_log_is_a_line_now_and_then_not_a_redrawn_bar(monkeypatch):
    import io

    from lib_mos.cli import main as cli

    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 50.0])
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))
    stream = io.StringIO()  # not a terminal
    bar = cli.ProgressBar(stream, width=10)
    for done in range(5):  # 0 s: the first line; 1 and 2 s: nothing; 40 s: 30 s passed; 41 s: done
        bar(f"te: solving: layer{done}", done, 4)
    bar("kv: solving: x", 1, 2)  # a new stage's first update is written at once
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and stream.getvalue().endswith("\n")
    assert [line.split("| ")[1].split(" [")[0] for line in lines] == ["0/4", "3/4", "4/4", "1/2"]
    assert lines[1].endswith("layer3") and lines[3].startswith("kv: solving |")


def test_report_text_marks_flags_and_reads_old_reports():
    old = {"concept": "cat", "stage": "te", "layers": 48, "fused": 0.1, "average": 0.7}  # before held-out checks
    new = {**old, "stage": "spatial", "layers": 96, "held_out": 1.3, "held_out_average": 0.7, "distance": 12.3,
           "rows": 32, "held_out_rows": 8, "width": 128, "capped": 3, "flags": ["held-out", "distance"]}
    text = fusion_report.format_report([old, new], ["spatial: the fused change is 9x"]).splitlines()
    assert text[0].split() == ["concept", "stage", "layers", "fused", "averaged", "stacked", "held-out", "averaged",
                               "stacked", "distance", "rows/width", "flags"]
    assert text[1].split() == ["cat", "te", "48", "0.1000", "0.7000", "-", "-", "-", "-", "-", "-"]
    assert text[2].split()[6:] == ["1.3000", "0.7000", "-", "12.30x", "32/128", "!", "held-out,", "distance"]
    assert text[3].startswith("note: spatial: the trust region capped 3 of 96 layers")  # no summary: no stacking
    assert text[4] == "WARNING: spatial: the fused change is 9x"


def test_report_summary_line_per_concept_compares_fused_with_averaging_and_stacking():
    rows = [{"concept": c, "stage": st, "layers": 4, "fused": f, "average": 0.8, "stacked": 1.4, "held_out": h,
             "held_out_average": 0.8, "held_out_stacked": s} for c, st, f, h, s in
            [("cat", "te", 0.2, 0.3, 1.5), ("cat", "spatial", 0.4, 0.5, 1.3), ("dog", "te", 0.1, 0.9, 0.7)]]
    summary = fusion_report.concept_summary(rows)
    assert summary == [
        "cat: held-out error over 2 stage(s): fused 0.400, averaged 0.800, stacked 1.400 (best: fused)",
        "dog: held-out error over 1 stage(s): fused 0.900, averaged 0.800, stacked 0.700 (best: stacked)"]
    assert fusion_report.format_report(rows).splitlines()[-2:] == summary


def test_the_reports_verdict_is_what_the_merged_model_draws():
    """A picture row decides the verdict over the layer errors, and a method other than fusion is
    named with what to do instead."""
    layer = {"concept": "cat", "stage": "spatial", "layers": 4, "fused": 0.1, "average": 0.8, "stacked": 1.4}
    rows = [layer, {**layer, "concept": "dog"},
            {"concept": "cat", "stage": "picture", "layers": 0, "fused": 0.9, "average": 0.3, "stacked": 0.7},
            {"concept": "dog", "stage": "picture", "layers": 0, "fused": 0.2, "average": 0.3, "stacked": 0.7}]
    cat, dog = fusion_report.concept_summary(rows)
    assert cat.startswith("cat: what it draws") and "fused 0.900, averaged 0.300, stacked 0.700 (best: averaged)" in cat
    assert "averaged keeps it better than fusion" in cat and "region" in cat
    assert dog.endswith("(best: fused)")
    assert fusion_report.verdicts(rows) == {"cat": "average", "dog": "fused"}


def test_kv_stage_records_the_concept_tokens_and_the_real_eos(tiny, inputs, monkeypatch):
    """k/v rows are the two concept tokens and the EOS after them, for each prompt (the slots hold a
    placeholder id that is not EOS: bigG's pooled output and zero padding start at the first EOS)."""
    seen: list[torch.Tensor] = []
    original = fusion.LayerStats.add

    def spy(self, x):
        if self.out_features == self.in_features == 32 and not self.report_only:  # one 320-like layer
            seen.append(x.clone())
        return original(self, x)

    monkeypatch.setattr(fusion.LayerStats, "add", spy)
    names = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    concept = dataclasses.replace(inputs[0].concept, text_lora={},
                                  unet_lora={n: inputs[0].concept.unet_lora[n] for n in names})
    fusion.fuse(tiny, [fusion.FusionInput(concept)], dataclasses.replace(FAST, skip=frozenset({"te", "spatial"})))
    binder = binding.PromptBinder(tiny, [concept])
    expected = []
    for prompt in fusion.prompts_for(concept):
        ids, slots = binder.tokenize_bound(prompt)
        assert tiny.tokenizer.eos_token_id not in [ids[pos] for pos, _ in slots]
        end = fusion._eos_position(ids, tiny.tokenizer.eos_token_id)
        assert end == slots[-1][0] + 1  # both prompts end with the concept tokens
        expected.append(binder.encode([prompt])[0, 0, [pos for pos, _ in slots] + [end]])
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], torch.cat(expected))


def test_concept_specs_carry_renames_and_merge_weights():
    spec = fused_checkpoint.parse_concept_spec
    assert spec("a/cat.safetensors") == fused_checkpoint.ConceptSpec("a/cat.safetensors", None, 1.0, 1.0)
    assert spec("a/cat.safetensors:<x>+<y>@0.5,0.25", 0.9, 0.9) == fused_checkpoint.ConceptSpec(
        "a/cat.safetensors", ("<x>", "<y>"), 0.5, 0.25)
    assert spec("C:\\m@x\\cat.pth@1,0.9") == fused_checkpoint.ConceptSpec("C:\\m@x\\cat.pth", None, 1.0, 0.9)
    assert spec("me@host/cat.safetensors", 0.7, 0.6) == fused_checkpoint.ConceptSpec("me@host/cat.safetensors", None, 0.7, 0.6)
    with pytest.raises(ConceptError, match="empty token"):
        spec("cat.safetensors:<x>+@1,1")
