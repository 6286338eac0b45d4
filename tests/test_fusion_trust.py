"""Can a fused checkpoint be trusted? On the tiny model: the unregularised solve's damage (widest
layers underdetermined, weights far from the base and the concepts, an in-sample report that looks
fine) is reproduced and caught by the held-out report; the default solve stays within the stated
bounds for the spatial settings the CLI and the tab accept, and its report raises no flag."""

from __future__ import annotations

import dataclasses

import pytest

from lib_mos.concepts import synthetic
from lib_mos.fusion import pipeline as fusion
from lib_mos.fusion import report as fusion_report
from lib_mos.models import sd1

# The small settings, one noise seed as before; the unregularised solve is the old one: the
# least-squares fit closest to W0 (its ridge 1e-6 of mean(diag G) was iterated away on purpose),
# no validation, no trust region.
SMALL = fusion.FusionSettings(spatial_steps=2, spatial_size=64, spatial_seeds=1)
UNREGULARISED = dataclasses.replace(SMALL, ridge=1e-8, prior="base", validate=False, max_change=None, check_steps=0)


@pytest.fixture(scope="module")
def tiny() -> sd1.SD1Model:
    return sd1.build_tiny_sd1(0)


@pytest.fixture(scope="module")
def inputs(tiny) -> list[fusion.FusionInput]:
    return [fusion.FusionInput(synthetic.random_concept(tiny, (f"<c{k}a>", f"<c{k}b>"), seed=k + 1, name=f"c{k}"))
            for k in range(2)]


def _moves(tiny, inputs, result) -> dict[str, tuple[float, float, float]]:
    """Per fused layer: ||W - W0||_F / sum_i ||dW_i||_F, max|W| / max|W0|, and the distance to the
    nearest concept's weight in units of its change, min_i ||W - W_i||_F / ||dW_i||_F (at most
    1 + DISTANCE_BOUND * sum_j ||dW_j||_F / ||dW_i||_F once the first is in bounds)."""
    out = {}
    for name, w in {**result.text_weights, **result.unet_weights}.items():
        text = name in result.text_weights
        w0 = (tiny.text_encoder if text else tiny.unet).get_submodule(name).weight.detach()
        deltas = [(i.concept.text_lora if text else i.concept.unet_lora)[name].delta() for i in inputs]
        out[name] = (float((w - w0).norm() / sum(d.norm() for d in deltas)), float(w.abs().max() / w0.abs().max()),
                     min(float((w - w0 - d).norm() / d.norm()) for d in deltas))
    return out


def test_unregularised_solve_damages_and_only_the_held_out_report_sees_it(tiny, inputs):
    result = fusion.fuse(tiny, inputs, UNREGULARISED)
    spatial = [r for r in result.report if r["stage"] == "spatial"]
    # the widest spatial layers saw fewer rows than they have inputs
    assert all(r["rows"] < r["width"] for r in spatial) and any("narrower than" in w for w in result.warnings)
    moves = _moves(tiny, inputs, result)
    assert max(change for change, _, _ in moves.values()) > 20
    assert max(peak for _, peak, _ in moves.values()) > 10
    assert max(nearest for _, _, nearest in moves.values()) > 20  # far from every concept too
    assert sum(change > 1 for change, _, _ in moves.values()) > 50
    # what the report used to show, recorded inputs only: better than averaging everywhere
    assert all(r["fused"] < r["average"] for r in result.report)
    # the held-out errors and the distance catch it, and say so
    flagged = {(r["stage"], flag) for r in result.report for flag in r["flags"]}
    assert {("te", "distance"), ("spatial", "held-out"), ("spatial", "distance")} <= flagged
    assert all(r["held_out"] > 5 * r["held_out_average"] for r in spatial)
    assert sum("held-out error" in w for w in result.warnings) == sum("held-out" in r["flags"] for r in result.report)
    text = fusion_report.format_report(result.report, result.warnings)
    assert text.count("! held-out, distance") >= 2 and "WARNING: te: the fused change is" in text


@pytest.mark.parametrize(("steps", "size", "seeds"), [
    (1, 8, 1),      # the smallest the CLI accepts: one latent cell
    (2, 64, 1),     # the small settings (scaled to the tiny model)
    (1, 256, 4),    # the smallest the tab offers, default seeds
    (20, 128, 4),   # the defaults, at a size scaled to the tiny model's widths (a tenth of SD1.5's)
])
def test_default_solve_stays_within_bounds(tiny, inputs, steps, size, seeds):
    settings = dataclasses.replace(fusion.FusionSettings(), spatial_steps=steps, spatial_size=size, spatial_seeds=seeds,
                                   check_steps=0)  # the solve's bounds; the picture check is tested in test_fusion
    result = fusion.fuse(tiny, inputs, settings)
    moves = _moves(tiny, inputs, result)
    assert len(moves) == 176
    worst = max(moves, key=lambda n: moves[n][0])
    assert moves[worst][0] <= fusion_report.DISTANCE_BOUND, worst
    assert max(peak for _, peak, _ in moves.values()) < 2.0
    assert not any("distance" in r["flags"] for r in result.report)
    assert all(r["change"] <= fusion_report.DISTANCE_BOUND for r in result.report)
    # the report still shows fusion keeping more of each concept than averaging does
    assert all(r["fused"] < r["average"] for r in result.report)
    if seeds > 1:  # default seeds: held-out errors in bounds, no flags; a shortfall only at the tab's minimum
        assert all(r["held_out"] < fusion_report.HELD_OUT_BOUND and not r["flags"] for r in result.report)
        assert all("narrower than" in w for w in result.warnings)
        assert bool(result.warnings) == (steps == 1)
