"""Gradient fusion on SDXL (tiny model): both text encoders in the te stage, the 70 attn2 layers'
k/v fed by each layer's own copy of the 2048-wide (here 80-wide) context, the spatial stage and
the picture check sampled with the vector, the live model untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_binding import snapshot

from lib_mos.concepts import binding
from lib_mos.concepts.synthetic import random_concept
from lib_mos.fusion import pipeline as fusion
from lib_mos.fusion import report as fusion_report
from lib_mos.models import sd1, sdxl
from lib_mos.models.family import SDXL

FAST = fusion.FusionSettings(spatial_steps=2, spatial_size=64, seed=0)


@pytest.fixture(scope="module")
def xl() -> sdxl.SDXLModel:
    return sdxl.build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def inputs(xl) -> list[fusion.FusionInput]:
    a = dataclasses.replace(random_concept(xl, ("<cat1>", "<cat2>"), seed=1), name="cat", source_sha256="a" * 64)
    b = dataclasses.replace(random_concept(xl, ("<dog1>", "<dog2>"), seed=2), name="dog", source_sha256="b" * 64)
    return [fusion.FusionInput(a), fusion.FusionInput(b, unet_weight=0.8, text_weight=0.9)]


@pytest.fixture(scope="module")
def fused(xl, inputs) -> fusion.FusionResult:
    before = snapshot(xl)
    result = fusion.fuse(xl, inputs, FAST)
    after = snapshot(xl)
    assert all(torch.equal(before[k], after[k]) for k in before), "fusion changed the live model"
    return result


def test_every_stage_of_both_encoders_and_the_unet_is_fused_within_bounds(fused, inputs):
    layers = [r for r in fused.report if r["stage"] != fusion_report.PICTURE]
    assert {(r["stage"], r["layers"]) for r in layers} == {("te", 16), ("kv", 140), ("spatial", 420)}
    for row in layers:
        assert row["fused"] < row["average"], row
        assert row["change"] <= fusion_report.DISTANCE_BOUND and not row["flags"], row
    assert {n.split(".", 1)[0] for n in fused.text_weights} == {"0", "1"}  # CLIP-L and bigG
    assert set(fused.text_weights) == set(inputs[0].concept.text_lora)
    assert len(fused.unet_weights) == 560
    pictures = [r for r in fused.report if r["stage"] == fusion_report.PICTURE]
    assert [r["concept"] for r in pictures] == ["cat", "dog"]
    assert all(0 < r[m] < 10 for r in pictures for m in ("fused", "average", "stacked"))


def test_rows_per_concept(fused):
    """te: 70 layer copies of every token up to the EOS in both encoders (bigG pads with 0 after
    it), k/v: 2 prompts x (2 tokens + EOS), spatial: one latent cell x steps x seeds."""
    rows = {(r["concept"], r["stage"]): (r["rows"], r["held_out_rows"], r["width"]) for r in fused.report
            if r["stage"] != fusion_report.PICTURE}
    assert rows["cat", "te"] == (70 * (7 + 4), 70 * (11 + 8), 48)
    assert rows["cat", "kv"] == (6, 6, 80)
    steps, seeds = FAST.spatial_steps, FAST.spatial_seeds
    assert rows["dog", "spatial"] == (steps * seeds * 4, steps * 4, 128)  # 2 x 2 cells at level 2
    assert fusion.spatial_shortfall(xl_config(), FAST) in fused.warnings


def xl_config() -> sdxl.SDXLConfig:
    return sdxl.TINY_SDXL


def test_each_encoder_records_its_own_tokens_up_to_the_eos(xl, inputs, monkeypatch):
    """A te2 layer sees bigG's inputs at BOS ... EOS of every layer copy, nothing after (bigG's
    ids are 0 there, CLIP-L's are EOS); a te1 layer as many rows of its own width."""
    seen: dict[int, list[int]] = {}
    original = fusion.LayerStats.add

    def spy(self, x):
        if not self.report_only and self.in_features in (32, 48) and self.out_features == self.in_features:
            seen.setdefault(self.in_features, []).append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(fusion.LayerStats, "add", spy)
    concept = dataclasses.replace(inputs[0].concept, unet_lora={}, text_lora={
        n: inputs[0].concept.text_lora[n] for n in ("0.text_model.encoder.layers.1.self_attn.q_proj",
                                                    "1.text_model.encoder.layers.0.self_attn.k_proj")})
    fusion.fuse(xl, [fusion.FusionInput(concept)], dataclasses.replace(FAST, skip=frozenset({"kv", "spatial"}),
                                                                      check_steps=0))
    assert sum(seen[32]) == sum(seen[48]) == 70 * (7 + 4)


def test_kv_rows_are_each_layers_own_copy_at_the_tokens_and_eos(xl, inputs, monkeypatch):
    """The last attn2 layer's to_v learns from the 70th copy of the context (layer order), both
    encoders' parts (80 wide), at the two concept tokens and the EOS."""
    name = f"{SDXL.attn2[-1]}.to_v"
    seen: list[torch.Tensor] = []
    original = fusion.LayerStats.add

    def spy(self, x):
        if not self.report_only:
            seen.append(x.clone())
        return original(self, x)

    monkeypatch.setattr(fusion.LayerStats, "add", spy)
    concept = dataclasses.replace(inputs[0].concept, text_lora={}, unet_lora={name: inputs[0].concept.unet_lora[name]})
    fusion.fuse(xl, [fusion.FusionInput(concept)], dataclasses.replace(FAST, skip=frozenset({"te", "spatial"}),
                                                                      check_steps=0))
    binder = binding.PromptBinder(xl, [concept])
    expected = []
    for prompt in fusion.prompts_for(concept):
        _, slots = binder.tokenize_bound(prompt)
        positions = [pos for pos, _ in slots] + [slots[-1][0] + 1]
        expected.append(binder.encode([prompt])[0, SDXL.layers - 1, positions])
    assert len(seen) == 1 and seen[0].shape == (6, 80)
    torch.testing.assert_close(seen[0], torch.cat(expected))


def test_an_sd1_concept_is_refused_by_name(xl, inputs):
    sd1_concept = dataclasses.replace(random_concept(sd1.build_tiny_sd1(0), ("<x1>", "<x2>"), seed=4),
                                      name="x", source_path="x.safetensors")
    with pytest.raises(Exception, match=r"x\.safetensors"):
        fusion.fuse(xl, [inputs[0], fusion.FusionInput(sd1_concept)], FAST)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_encoding_up_to_the_eos_is_the_full_encoding_there(xl, inputs, family):
    """Fusion encodes only up to the last EOS (the encoders are causal): every position up to each
    prompt's EOS equals the full 77-token encoding, for bound prompts and plain trigger words."""
    model = xl if family == "sdxl" else sd1.build_tiny_sd1(0)
    concept = inputs[0].concept if family == "sdxl" else random_concept(model, ("<cat1>", "<cat2>"), seed=1)
    binder = binding.PromptBinder(model, [concept])
    for prompts in (["photo of a <cat1> <cat2>", "a close-up picture of <cat1> <cat2> outdoors"],
                    ["ohwx dog", "a photo of ohwx dog in the snow"]):
        short, full = binder.encode_to_eos(prompts), binder.encode(prompts)
        assert short.shape[2] < 77 and short.shape[:2] == full.shape[:2]
        for p, prompt in enumerate(prompts):
            end = binder.tokenize_bound(prompt)[0].index(model.tokenizer.eos_token_id) + 1
            torch.testing.assert_close(short[p, :, :end], full[p, :, :end], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_parts_read_from_the_file_when_needed_give_the_same_fusion(tmp_path, family, inputs, monkeypatch):
    """Fusing a model read from its file with `CheckpointWeights` (the UNet absent during the text
    stages, only the k/v layers read for theirs, the encoders gone before the UNet comes back) gives
    exactly the weights of the same fusion with everything in memory."""
    from lib_mos.models import checkpoints
    from lib_mos.models.checkpoint_parts import CheckpointWeights

    if family == "sdxl":
        model, items = sdxl.build_tiny_sdxl(0), inputs
        path = sdxl.save_checkpoint(model, tmp_path / "xl.safetensors")
    else:
        model = sd1.build_tiny_sd1(0)
        items = [fusion.FusionInput(dataclasses.replace(random_concept(model, (f"<c{k}a>", f"<c{k}b>"), seed=k),
                                                        name=f"c{k}", source_sha256=str(k) * 64)) for k in (1, 2)]
        path = sd1.save_checkpoint(model, tmp_path / "sd1.safetensors")
    settings = dataclasses.replace(FAST, check_steps=1)
    resident = fusion.fuse(checkpoints.load_checkpoint(path), items, settings)
    lazy_model = checkpoints.load_checkpoint(path, unet=False)  # as fuse_checkpoint reads it
    unet_real: list[tuple[str, int]] = []
    original = fusion.LayerStats.add

    def spy(self, x):  # how much of the UNet is in memory when each layer records
        unet_real.append((self.in_features, sum(p.device.type != "meta" for p in lazy_model.unet.parameters())))
        return original(self, x)

    monkeypatch.setattr(fusion.LayerStats, "add", spy)
    lazy = fusion.fuse(lazy_model, items, settings, weights=CheckpointWeights(path, lazy_model))
    total = sum(1 for _ in lazy_model.unet.parameters())
    assert unet_real[0][1] == 0  # te stage: no UNet at all
    assert 0 < min(n for _, n in unet_real if n) < total  # k/v: only its layers
    assert unet_real[-1][1] == total
    assert all(p.device.type == "meta" for p in lazy_model.text_root.parameters())  # gone for the spatial stage
    for table in ("text_weights", "unet_weights", "text_biases", "unet_biases"):
        a, b = getattr(resident, table), getattr(lazy, table)
        assert set(a) == set(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    assert [r.get("fused") for r in lazy.report] == pytest.approx([r.get("fused") for r in resident.report], rel=1e-5)


def test_a_released_part_reads_back_bit_identical(tmp_path):
    """bigG's q/k/v come back from the thirds of the file's stacked in_proj, its projection
    transposed back: every tensor of both parts equals the loader's after release and load."""
    from lib_mos.models import checkpoints
    from lib_mos.models.checkpoint_parts import CheckpointWeights

    path = sdxl.save_checkpoint(sdxl.build_tiny_sdxl(0), tmp_path / "xl.safetensors", dtype=torch.float16)
    model = checkpoints.load_checkpoint(path, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in {**model.unet.state_dict(), **model.text_root.state_dict()}.items()}
    weights = CheckpointWeights(path, model)
    for part in ("text", "unet"):
        weights.release(part)
    assert all(p.device.type == "meta" for p in (*model.unet.parameters(), *model.text_root.parameters()))
    weights.load("unet", [f"{SDXL.attn2[0]}.to_k"])
    weights.load("unet")
    weights.load("text")
    after = {**model.unet.state_dict(), **model.text_root.state_dict()}
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_fused_weights_kept_on_disk_are_the_same_and_the_checkpoint_job_writes_them(tmp_path, inputs, xl):
    """With a store the fused weights wait in files (`DiskTensors`), not memory: the same values,
    and `fuse_checkpoint` (in-place swaps and reloads from the base file) writes them into the file."""
    from lib_mos.concepts.files import write_concept
    from lib_mos.fusion import checkpoint as fused_checkpoint
    from lib_mos.fusion import memory

    settings = dataclasses.replace(FAST, check_steps=1)
    in_memory = fusion.fuse(xl, inputs, settings)
    on_disk = fusion.fuse(xl, inputs, settings, store=tmp_path / "store")
    assert isinstance(on_disk.unet_weights, memory.DiskTensors) and len(on_disk.unet_weights) == 560
    for name in in_memory.unet_weights:
        assert torch.equal(on_disk.unet_weights[name], in_memory.unet_weights[name]), name
    base = sdxl.save_checkpoint(xl, tmp_path / "base.safetensors")
    specs = [fused_checkpoint.ConceptSpec(str(write_concept(i.concept, tmp_path / f"{i.concept.name}.safetensors")),
                                          unet_weight=i.unet_weight, text_weight=i.text_weight) for i in inputs]
    out, result = fused_checkpoint.fuse_checkpoint(base, specs, tmp_path / "fused.safetensors", settings,
                                                   dtype=torch.float32, model_dtype=torch.float32)
    fused = sdxl.load_checkpoint(out)
    for name in ("output_blocks.2.1.transformer_blocks.9.attn1.to_q", f"{SDXL.attn2[5]}.to_v"):
        torch.testing.assert_close(fused.unet.get_submodule(name).weight, in_memory.unet_weights[name],
                                   rtol=1e-4, atol=1e-5)
    name = "1.text_model.encoder.layers.1.self_attn.v_proj"
    torch.testing.assert_close(fused.text_root.get_submodule(name).weight, in_memory.text_weights[name],
                               rtol=1e-4, atol=1e-5)
    assert [r.get("fused") for r in result.report] == pytest.approx([r.get("fused") for r in in_memory.report],
                                                                     rel=1e-4)


def test_a_concept_applied_with_the_files_restore_changes_layers_in_place_and_reads_them_back(tmp_path, inputs, xl):
    """In a fusion from a file, a concept's LoRA is added into the layers' own storage (no copy of
    the 420 layers it changes, 1.2 GB on SDXL) and the layers are read from the file afterwards."""
    from lib_mos.concepts.concept import applied
    from lib_mos.models import checkpoints
    from lib_mos.models.checkpoint_parts import CheckpointWeights

    path = sdxl.save_checkpoint(xl, tmp_path / "xl.safetensors", dtype=torch.float16)
    model = checkpoints.load_checkpoint(path, dtype=torch.bfloat16)
    concept = inputs[0].concept
    layers = [model.unet.get_submodule(next(iter(concept.unet_lora))),
              model.text_root.get_submodule(next(iter(concept.text_lora)))]
    before = [layer.weight.detach().clone() for layer in layers]
    storage = [layer.weight.data_ptr() for layer in layers]
    with applied([(concept, 1.0, 1.0)], model.unet, model.text_root, CheckpointWeights(path, model).changed):
        assert [layer.weight.data_ptr() for layer in layers] == storage
        assert not any(torch.equal(layer.weight, b) for layer, b in zip(layers, before))
    for layer, b in zip(layers, before):
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, b)


def test_no_fused_weight_read_from_the_store_is_held_while_the_spatial_stage_samples(tmp_path, inputs, xl,
                                                                                  monkeypatch):
    """The fused k/v weights go into the UNet for the spatial stage one at a time and are dropped:
    held together (as a dict of them once was) SDXL's are 1.3 GB of float32 for the whole stage."""
    import weakref

    from lib_mos.fusion import memory
    from lib_mos.models import checkpoints, sampling
    from lib_mos.models.checkpoint_parts import CheckpointWeights

    path = sdxl.save_checkpoint(xl, tmp_path / "xl.safetensors")
    model = checkpoints.load_checkpoint(path, unet=False)
    read: list[weakref.ref] = []
    original_read, original_sample = memory.DiskTensors.__getitem__, sampling.sample_euler
    alive_while_sampling: list[int] = []

    def spy_read(self, key):
        tensor = original_read(self, key)
        read.append(weakref.ref(tensor))
        return tensor

    def spy_sample(*args, **kwargs):
        alive_while_sampling.append(sum(r() is not None for r in read))
        return original_sample(*args, **kwargs)

    monkeypatch.setattr(memory.DiskTensors, "__getitem__", spy_read)
    monkeypatch.setattr(sampling, "sample_euler", spy_sample)
    fusion.fuse(model, inputs, dataclasses.replace(FAST, check_steps=0), weights=CheckpointWeights(path, model),
                store=tmp_path / "store")
    assert read and alive_while_sampling, "the spatial stage did not read fused k/v weights and sample"
    assert alive_while_sampling == [0] * len(alive_while_sampling)


def test_the_file_job_runs_sdxl_in_bfloat16_on_the_cpu(tmp_path, inputs, xl):
    """By default an SDXL base is fused in bfloat16 on the CPU (the UNet sampled under autocast,
    its norms in float32): it runs, and its fused weights are the float32 fusion's to bf16 noise."""
    from lib_mos.concepts.files import write_concept
    from lib_mos.fusion import checkpoint as fused_checkpoint

    settings = dataclasses.replace(FAST, check_steps=1)
    want = fusion.fuse(xl, inputs, settings)
    base = sdxl.save_checkpoint(xl, tmp_path / "base.safetensors", dtype=torch.float16)
    specs = [fused_checkpoint.ConceptSpec(str(write_concept(i.concept, tmp_path / f"{i.concept.name}.safetensors")),
                                          unet_weight=i.unet_weight, text_weight=i.text_weight) for i in inputs]
    out, result = fused_checkpoint.fuse_checkpoint(base, specs, tmp_path / "fused.safetensors", settings)
    fused = sdxl.load_checkpoint(out)
    assert {r["stage"] for r in result.report} == {"te", "kv", "spatial", "picture"}
    for name in ("input_blocks.4.1.transformer_blocks.0.attn1.to_out.0", f"{SDXL.attn2[-1]}.to_k"):
        got, ref = fused.unet.get_submodule(name).weight, want.unet_weights[name]
        assert (got - ref).norm() / ref.norm() < 0.05, name
