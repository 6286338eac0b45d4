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
        ids, slots = binder.tokenize_bound(prompt)
        positions = [pos for pos, _ in slots] + [slots[-1][0] + 1]
        expected.append(binder.encode([prompt])[0, SDXL.layers - 1, positions])
    assert len(seen) == 1 and seen[0].shape == (6, 80)
    torch.testing.assert_close(seen[0], torch.cat(expected))


def test_an_sd1_concept_is_refused_by_name(xl, inputs):
    sd1_concept = dataclasses.replace(random_concept(sd1.build_tiny_sd1(0), ("<x1>", "<x2>"), seed=4),
                                      name="x", source_path="x.safetensors")
    with pytest.raises(Exception, match="x.safetensors"):
        fusion.fuse(xl, [inputs[0], fusion.FusionInput(sd1_concept)], FAST)
