"""Fusion over every layer a LoRA changes: convolutions solved as linears over their input patches
(checked against a brute-force least squares built from the convolution itself), biases fused with
their weights, spatial layers recorded in passes under a memory budget, and mixed sets (ED-LoRA,
kohya LoRA/LoCon and LoHa trigger-word concepts) that beat averaging and stacking."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_binding import make_concept
from torch import nn

from lib_mos.concepts.concept import Concept, ConceptError, ModuleDelta
from lib_mos.fusion import checkpoint as fused_checkpoint
from lib_mos.fusion import memory
from lib_mos.fusion import pipeline as fusion
from lib_mos.fusion import report as fusion_report
from lib_mos.fusion.solver import LayerStats, solve_exact
from lib_mos.models import sd1

# the layers' solve and report; the picture check (a few UNet runs per concept) is tested in test_fusion
FAST = fusion.FusionSettings(spatial_steps=2, spatial_size=64, seed=0, check_steps=0)


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


# Sizes: changes of about the size of `synthetic.random_concept`'s ED-LoRA (entries ~0.02), so a
# mixed set's concepts weigh alike in the shared layers.
def _lora(weight: torch.Tensor, gen: torch.Generator, rank: int = 4, size: float = 0.12) -> ModuleDelta:
    """A kohya LoRA / LoCon layer for a weight of this shape (conv: down carries the kernel)."""
    if weight.dim() == 4:
        down = torch.randn(rank, *weight.shape[1:], generator=gen) * size
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=gen) * size
    else:
        down = torch.randn(rank, weight.shape[1], generator=gen) * size
        up = torch.randn(weight.shape[0], rank, generator=gen) * size
    return ModuleDelta.of("lora", {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.0)})


def _loha(weight: torch.Tensor, gen: torch.Generator, rank: int = 2, size: float = 0.3) -> ModuleDelta:
    cols = weight[0].numel()
    parts = {"hada_w1_a": torch.randn(weight.shape[0], rank, generator=gen) * size,
             "hada_w1_b": torch.randn(rank, cols, generator=gen) * size,
             "hada_w2_a": torch.randn(weight.shape[0], rank, generator=gen) * size,
             "hada_w2_b": torch.randn(rank, cols, generator=gen) * size, "alpha": torch.tensor(float(rank))}
    return ModuleDelta.of("loha", parts)


def _layers(root: nn.Module, keep) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and keep(n)]


# One of each layer kind a LoCon trains, at every resolution but not in every block (the solve of
# each kind is the same; all 236 tiny layers would cost a minute per fusion): the attention blocks'
# linears and 1x1 proj convs, resnet 3x3 convs, a 1x1 shortcut, time-embedding projections, a
# downsampler and an upsampler.
UNET_LAYERS = ("input_blocks.1.1.", "middle_block.1.", "output_blocks.10.1.", "input_blocks.1.0.",
               "input_blocks.4.0.skip_connection", "input_blocks.3.0.op", "output_blocks.8.2.conv",
               "output_blocks.6.0.in_layers.2", "middle_block.0.emb_layers.1")
TEXT_LAYERS = ("layers.0.", "layers.5.", "layers.11.")


def trigger_concept(model: sd1.SD1Model, name: str, words: str, seed: int, make=_lora) -> Concept:
    """A kohya-style LoRA with LoCon layers (UNET_LAYERS) and text-encoder attention and MLP."""
    gen = torch.Generator().manual_seed(seed)
    unet = {n: make(model.unet.get_submodule(n).weight, gen)
            for n in _layers(model.unet, lambda n: any(n.startswith(k) for k in UNET_LAYERS))}
    text = {n: make(model.text_encoder.get_submodule(n).weight, gen)
            for n in _layers(model.text_encoder, lambda n: any(k in n for k in TEXT_LAYERS))}
    return Concept(name=name, tokens=(), embeddings=torch.zeros(0, 16, 0), unet_lora=unet, text_lora=text,
                   triggers=(words,), source_sha256=f"{seed:064d}")


def _conv_outputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, weight, bias, conv.stride, conv.padding)


@pytest.mark.parametrize("stride,with_bias", [(1, False), (2, False), (1, True)])
def test_conv_solve_matches_brute_force_least_squares(stride, with_bias):
    """The fused conv weight minimises sum_i ||conv(X_i; W) - conv(X_i; W_i)||^2: built here from
    the convolution itself (its output on each basis weight), independent of the unfolding."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=1, bias=True).double()
    w0, b0 = conv.weight.data.clone(), conv.bias.data.clone()
    deltas = [_lora(w0, gen, rank=2) for _ in range(2)]
    bias_deltas = [torch.randn(4, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None for _ in range(2)]
    images = [torch.randn(3, 3, 7, 7, generator=gen, dtype=torch.float64) for _ in range(2)]

    rows = fusion._layer_rows(conv, with_bias)
    base = fusion._base_matrix(conv, with_bias).double()
    stats = LayerStats(base, per_concept_dtype=torch.float64)
    for d, db, x in zip(deltas, bias_deltas, images):
        change = d.matrix(torch.float64)
        if with_bias:
            change = torch.cat([change, db[:, None]], dim=1)
        stats.begin_concept(delta=change)
        stats.add(rows(x))
        stats.end_concept()
    fused = solve_exact(stats, ridge=0.0, max_change=None).double()

    n_w = w0.numel()
    basis = torch.eye(n_w + (4 if with_bias else 0), dtype=torch.float64)
    design, target = [], []
    for d, db, x in zip(deltas, bias_deltas, images):
        cols = [_conv_outputs(x, e[:n_w].reshape(w0.shape), e[n_w:] if with_bias else None, conv).flatten()
                for e in basis]
        design.append(torch.stack(cols, dim=1))
        w_i = w0 + d.matrix(torch.float64).reshape(w0.shape)
        b_i = b0 + db if with_bias else None
        # a fixed bias is the same on both sides, so it only enters when fused
        target.append(_conv_outputs(x, w_i, b_i, conv).flatten())
    best = torch.linalg.lstsq(torch.cat(design), torch.cat(target)[:, None]).solution[:, 0]
    expect = best[:n_w].reshape(4, -1)
    if with_bias:
        expect = torch.cat([expect, best[n_w:, None]], dim=1)
    torch.testing.assert_close(fused, expect, rtol=1e-6, atol=1e-8)


def test_one_locon_concept_fuses_to_its_own_weights(tiny):
    """One concept alone keeps its own change on every layer kind, convs in their 4-D shape."""
    concept = trigger_concept(tiny, "dog", "ohwx dog", seed=3)
    result = fusion.fuse(tiny, [fusion.FusionInput(concept, unet_weight=0.7)], FAST)
    convs = [n for n in concept.unet_lora if isinstance(tiny.unet.get_submodule(n), nn.Conv2d)]
    assert len(convs) >= 8 and set(result.unet_weights) == set(concept.unet_lora)
    layers = (*concept.unet_lora, *concept.text_lora)
    for kind in ("mlp.fc1", "mlp.fc2", "ff.net.2", "proj_in", "in_layers.2", ".op", ".2.conv", "skip_connection",
                 "emb_layers.1"):
        assert any(n.endswith(kind) for n in layers), kind
    for name, f in concept.unet_lora.items():
        base = tiny.unet.get_submodule(name).weight
        want = base + 0.7 * f.matrix(torch.float32).reshape(base.shape)
        assert result.unet_weights[name].shape == base.shape
        torch.testing.assert_close(result.unet_weights[name], want, rtol=1e-4, atol=1e-5)


def test_spatial_passes_under_a_small_budget_give_the_same_weights(tiny, monkeypatch):
    """Recording the spatial layers in several sampling passes (a whole-process budget that leaves
    room for less than all of their statistics beside the model) reproduces the one-pass result
    exactly: the same seeds, the same inputs per layer."""
    concepts = [fusion.FusionInput(trigger_concept(tiny, f"c{k}", w, seed=10 + k)) for k, w in enumerate(("sks", "zxq"))]
    settings = dataclasses.replace(FAST, skip=frozenset({"te", "kv"}))
    names = sorted(concepts[0].concept.unet_lora)
    one = fusion.fuse(tiny, concepts, settings)
    spatial = [n for n in names if "attn2.to_" not in n]
    sizes = [memory.layer_stats_bytes(tiny.unet.get_submodule(n).weight[0].numel(),
                                      tiny.unet.get_submodule(n).weight.shape[0]) for n in spatial]
    stats = max(sum(sizes) / 2.5, max(sizes))
    count = len(memory.passes(tiny.unet, spatial, frozenset(), int(stats)))
    assert count >= 3
    # the tiny model's own sizes: no interpreter or batch to leave room for, the model's bytes are
    budget = (memory.resident_bytes(tiny.unet, tiny.text_root) + stats) / memory.GIB
    for name in ("unet_activation_bytes", "transient_bytes"):
        monkeypatch.setattr(memory, name, lambda *a, **k: 0)
    monkeypatch.setattr(memory, "BASELINE_BYTES", 0)
    seen: list[str] = []
    split = fusion.fuse(tiny, concepts, dataclasses.replace(settings, memory_gb=budget),
                        progress=lambda what, done, n: seen.append(what))
    assert any(f"pass {count}/{count}" in w for w in seen)
    assert set(split.unet_weights) == set(one.unet_weights)
    for name, w in one.unet_weights.items():
        assert torch.equal(split.unet_weights[name], w), name
    assert [r["fused"] for r in split.report] == pytest.approx([r["fused"] for r in one.report], rel=1e-9)


def test_a_budget_too_small_for_the_model_and_one_layer_is_refused_before_any_work(tiny):
    concepts = [fusion.FusionInput(trigger_concept(tiny, "c0", "sks", seed=10))]
    calls: list[str] = []
    with pytest.raises(ConceptError, match=r"--memory-gb 0.5 is too small for the te stage.*use at least"):
        fusion.fuse(tiny, concepts, dataclasses.replace(FAST, memory_gb=0.5),
                    progress=lambda what, done, n: calls.append(what))
    assert not calls


def test_a_budget_too_small_for_the_spatial_stage_is_refused_before_the_text_stages(tiny, monkeypatch):
    """The text stages fit, the spatial stage's sampling does not: the refusal comes before the
    text stages' work (on SDXL they take 12 minutes on a CPU), naming the spatial stage."""
    concepts = [fusion.FusionInput(trigger_concept(tiny, "c0", "sks", seed=10))]
    monkeypatch.setattr(memory, "unet_activation_bytes", lambda *a, **k: 4 * memory.GIB)
    calls: list[str] = []
    with pytest.raises(ConceptError, match=r"--memory-gb 3 is too small for the spatial stage.*use at least 4"):
        fusion.fuse(tiny, concepts, dataclasses.replace(FAST, memory_gb=3),
                    progress=lambda what, done, n: calls.append(what))
    assert not calls


@pytest.fixture(scope="module")
def mixed(tiny):
    ed = dataclasses.replace(make_concept(tiny, ("<cat1>", "<cat2>"), seed=1), name="cat", source_sha256="a" * 64)
    items = [fusion.FusionInput(ed), fusion.FusionInput(trigger_concept(tiny, "dog", "ohwx dog", seed=2)),
             fusion.FusionInput(trigger_concept(tiny, "bird", "zkq bird", seed=4, make=_loha), unet_weight=0.8)]
    # 4 steps: with FAST's 2 the widest spatial layers see too few rows to move off the average
    return items, fusion.fuse(tiny, items, dataclasses.replace(FAST, spatial_steps=4))


def test_mixed_set_beats_averaging_and_stacking_on_every_stage(mixed):
    """Every concept's relative error, fused, is below averaging's in every stage; below stacking's
    too, except for the ED-LoRA concept: it alone changes most of its layers, where stacking is its
    own weight exactly and the report (which measures a concept where it changes something) does
    not see what that costs the other concepts."""
    _, result = mixed
    assert {(r["concept"], r["stage"]) for r in result.report} == {
        (c, s) for c in ("cat", "dog", "bird") for s in ("te", "kv", "spatial")}
    for row in result.report:
        assert row["fused"] < row["average"], row
        assert row["fused"] < row["stacked"] or row["concept"] == "cat", row


def test_balanced_solve_keeps_the_concept_with_the_smaller_change(tiny, mixed):
    """The authors' plain sum of squared errors lets the concepts with larger changes or more rows
    (here the trigger-word LoRAs) crowd out the others; the balanced solve (the default) minimises
    the sum of relative errors and leaves no concept worse off than averaging."""
    items, balanced = mixed
    plain = fusion.fuse(tiny, items, dataclasses.replace(FAST, spatial_steps=4, balance=False,
                                                         skip=frozenset({"spatial"})))
    worst = {name: max(r["fused"] / r["average"] for r in report if r["stage"] != "spatial")
             for name, report in (("plain", plain.report), ("balanced", balanced.report))}
    assert worst["balanced"] < 1.0 < worst["plain"], worst


def test_mixed_fused_checkpoint_loads_in_the_host(tmp_path, tiny, mixed):
    """Conv and linear layers land in the checkpoint in the host's layout; the double loads it and
    the live layers are the fused weights (fp16 as shipped)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from host_harness import HostHarness

    items, result = mixed
    base_path = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    ckpt = fused_checkpoint.write_fused_checkpoint(base_path, result, tmp_path / "fused-mixed.safetensors",
                                                   fused_checkpoint.fused_metadata(
                                                       items, FAST, result, {"lib_mos.sd1_config": tiny.config.to_json()}))
    concepts = fused_checkpoint.read_fused_concepts(ckpt)
    assert [c.tokens for c in concepts] == [("<cat1>", "<cat2>"), (), ()]
    assert [c.triggers for c in concepts] == [(), ("ohwx dog",), ("zkq bird",)]
    host = HostHarness(tmp_path / "root", ckpt)
    try:
        unet = host.model.model.diffusion_model
        for name in ("input_blocks.1.0.in_layers.2", "output_blocks.8.2.conv", "input_blocks.3.0.op",
                     "middle_block.1.transformer_blocks.0.ff.net.2", "input_blocks.1.1.proj_in"):
            assert torch.equal(unet.get_submodule(name).weight, result.unet_weights[name].half().float()), name
        text = host.model.cond_stage_model.wrapped.transformer
        assert torch.equal(text.get_submodule("text_model.encoder.layers.5.mlp.fc1").weight,
                           result.text_weights["text_model.encoder.layers.5.mlp.fc1"].half().float())
        assert host.txt2img("a photo of ohwx dog", steps=2).images
    finally:
        host.close()


def test_trigger_words_kv_rows_start_at_the_words(tiny, monkeypatch):
    """The encoder is causal, so a template's words before the trigger words encode alike for every
    concept; the k/v rows of a trigger-word concept run from its words to the EOS, as a token
    concept's rows are its tokens and the EOS."""
    concept = trigger_concept(tiny, "dog", "ohwx dog", seed=2)
    seen: list[int] = []
    original = fusion.LayerStats.add

    def spy(self, x):
        if not self.report_only and self.in_features == 32 and self.out_features == 32 and len(seen) < 100:
            seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(fusion.LayerStats, "add", spy)
    settings = dataclasses.replace(FAST, skip=frozenset({"te", "spatial"}), templates=("photo of a {}", "{}"),
                                   validate=False, held_out=False)
    fusion.fuse(tiny, [fusion.FusionInput(concept)], settings)
    # BOS photo of a ohwx dog EOS: rows 4..6, and for "{}" BOS ohwx dog EOS: rows 1..3
    words = len(tiny.tokenizer("ohwx dog", add_special_tokens=False)["input_ids"])
    assert words >= 2 and seen[:1] == [2 * (words + 1)]


def test_three_trigger_word_loras_fuse_better_than_averaging_and_stacking(tiny):
    """Three kohya-style LoRAs with the same layers, as users merge them: the fused error is below
    averaging's and stacking's in every stage, on the recorded inputs and on the held-out ones."""
    items = [fusion.FusionInput(trigger_concept(tiny, f"c{k}", w, seed=20 + k))
             for k, w in enumerate(("ohwx dog", "sks cat", "zkq bird"))]
    # 128 px: at 64 px the widest layers' held-out samples (one seed, 2 steps of an 8x8 latent) are
    # too few to tell fused from averaged apart (0.84-0.91 against 0.83-0.85, no flag)
    result = fusion.fuse(tiny, items, dataclasses.replace(FAST, spatial_steps=4, spatial_size=128))
    assert len(result.report) == 9
    for row in result.report:
        for pre in ("", "held_out_"):
            fused = row["fused" if not pre else "held_out"]
            assert fused < row[pre + "average"] and fused < row[pre + "stacked"], (pre, row)
    summary = fusion_report.concept_summary(result.report)
    assert len(summary) == 3 and all(line.endswith("(best: fused)") for line in summary), summary


def test_lora_files_of_every_kind_convert_and_fuse_with_an_ed_lora(tmp_path, tiny):
    """Files as the trainers write them (a kohya LoCon with its sidecar json, a LyCORIS LoHa) convert
    with the CLI, fuse with an authors' ED-LoRA file, and the fused checkpoint loads in the double
    with every changed layer, convolutions included, at its fused weight."""
    import subprocess
    import sys
    from pathlib import Path

    import lora_layouts as layouts
    from host_harness import HostHarness

    from lib_mos.concepts import synthetic

    repo = Path(__file__).resolve().parents[1]
    hero = layouts.kohya_locon(tiny, few=True).save(tmp_path, "hero")
    layouts.write_sidecar(hero, "ohwx man")
    bird = layouts.loha(tiny, few=True).save(tmp_path, "bird")
    cat = make_concept(tiny, ("<cat1>", "<cat2>"), seed=1)
    synthetic.save_torch_file(synthetic.authors_params(cat), tmp_path / "cat.pth")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lib_mos", *map(str, args)], capture_output=True, text=True,
                              cwd=repo, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    for src, extra in ((hero, ()), (bird, ("--trigger", "zkq bird"))):
        proc = cli("convert", src, tmp_path / f"{src.stem}-mos.safetensors", *extra)
        assert proc.returncode == 0, proc.stderr
    base = sd1.save_checkpoint(tiny, tmp_path / "base.safetensors")
    out = tmp_path / "fused.safetensors"
    proc = cli("fuse", "--base", base, "--out", out, "--spatial-steps", "2", "--spatial-size", "64", "--dtype", "fp32",
               "--concept", tmp_path / "cat.pth", "--concept", tmp_path / "hero-mos.safetensors",
               "--concept", tmp_path / "bird-mos.safetensors")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'trigger words "ohwx man"' in proc.stdout and 'trigger words "zkq bird"' in proc.stdout
    assert all(f"{c} " in proc.stdout and f"{c}: what it draws" in proc.stdout for c in ("cat", "hero", "bird"))
    fused = sd1.load_checkpoint(out)
    changed = {(kind, name) for f in (hero, bird) for kind, name in layouts.kohya_locon(tiny, few=True).layers
               + layouts.loha(tiny, few=True).layers}
    convs = [name for kind, name in changed if kind == "unet" and name.endswith(("in_layers.2", ".op", ".conv"))]
    assert len(convs) >= 5
    for name in convs:
        assert not torch.equal(fused.unet.get_submodule(name).weight, tiny.unet.get_submodule(name).weight), name
    host = HostHarness(tmp_path / "root", out)
    try:
        live = host.model.model.diffusion_model
        for name in convs:
            assert torch.equal(live.get_submodule(name).weight, fused.unet.get_submodule(name).weight), name
        assert host.txt2img("a photo of <cat1> <cat2> and ohwx man", steps=2).images
    finally:
        host.close()


def test_kv_passes_under_a_small_budget_give_the_same_weights(tiny, monkeypatch):
    """The k/v layers' dense parts (W0, changes: [out, in] each) are budgeted too: recorded in
    several passes, re-encoding the prompts, they give exactly the one-pass weights."""
    concepts = [fusion.FusionInput(dataclasses.replace(make_concept(tiny, (f"<c{k}a>", f"<c{k}b>"), seed=k),
                                                       name=f"c{k}", source_sha256=str(k) * 64)) for k in (1, 2)]
    settings = dataclasses.replace(FAST, skip=frozenset({"te", "spatial"}), check_steps=0)
    one = fusion.fuse(tiny, concepts, settings)
    kv = [n for n in sorted(one.unet_weights)]
    sizes = [memory.layer_stats_bytes(tiny.unet.get_submodule(n).weight.shape[1],
                                      tiny.unet.get_submodule(n).weight.shape[0], dense=False) for n in kv]
    stats = max(sum(sizes) / 3.5, max(sizes))
    for name in ("text_activation_bytes", "transient_bytes"):
        monkeypatch.setattr(memory, name, lambda *a, **k: 0)
    monkeypatch.setattr(memory, "BASELINE_BYTES", 0)
    seen: list[str] = []
    split = fusion.fuse(tiny, concepts, dataclasses.replace(
        settings, memory_gb=(memory.resident_bytes(tiny.unet, tiny.text_root) + stats) / memory.GIB),
        progress=lambda what, done, n: seen.append(what))
    assert any("kv: recording (pass 3/" in w for w in seen), sorted(set(seen))
    for name, w in one.unet_weights.items():
        assert torch.equal(split.unet_weights[name], w), name
