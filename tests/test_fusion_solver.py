"""The exact gradient-fusion solve against dense least squares, the authors' LBFGS and weight
averaging, plus the streaming/memory properties the hooks rely on."""

from __future__ import annotations

import math

import pytest
import torch

from lib_mos.fusion.solver import (
    MAX_CHANGE,
    RIDGE,
    RIDGES,
    LayerStats,
    objective,
    prior_delta,
    relative_errors,
    relative_errors_many,
    solve_exact,
    solve_lbfgs,
    weight_average,
)

OUT, IN = 24, 32


def _problem(rows: list[int], seed: int = 0, out: int = OUT, width: int = IN, rank: int = 4,
             duplicate_last: bool = False, row_rank: int | None = None,
             ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """W0, per-concept activations [n_i, in] (float64, of rank `row_rank` if given) and full target
    weights W0 + low-rank dW_i."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    xs, targets = [], []
    for n in rows:
        if row_rank is None:
            xs.append(torch.randn(n, width, generator=gen, dtype=torch.float64))
        else:
            xs.append(torch.randn(n, row_rank, generator=gen, dtype=torch.float64)
                      @ torch.randn(row_rank, width, generator=gen, dtype=torch.float64))
        up = torch.randn(out, rank, generator=gen, dtype=torch.float64) * 0.1
        down = torch.randn(rank, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
        targets.append(w0 + up @ down)
    if duplicate_last:
        xs.append(xs[-1].clone())
        targets.append(targets[-1].clone())
    return w0, xs, targets


def _stats(w0: torch.Tensor, xs: list[torch.Tensor], targets: list[torch.Tensor], chunk: int | None = None,
           spill_to=None, held: list[int] | None = None, **kwargs) -> LayerStats:
    """Stream the concepts in; optionally spill after each one and record the bytes then held."""
    stats = LayerStats(w0, **kwargs)
    for x, target in zip(xs, targets):
        stats.begin_concept(target)
        for part in (x.split(chunk) if chunk else (x,)):
            stats.add(part)
        stats.end_concept()
        if spill_to is not None:
            stats.spill(spill_to)
        if held is not None:
            held.append(stats.nbytes())
    return stats


def _lstsq_reference(w0: torch.Tensor, xs: list[torch.Tensor], targets: list[torch.Tensor],
                     prior: str = "base") -> torch.Tensor:
    """Dense least squares on the stacked activations closest to the prior (W0, or the weight
    average W0 + mean_i dW_i): minimum-norm solution for W - P (float64)."""
    x = torch.cat(xs)
    toward = sum(t - w0 for t in targets) / len(targets) if prior == "average" else torch.zeros_like(w0)
    y = torch.cat([xi @ (t - w0 - toward).mT for xi, t in zip(xs, targets)])
    return w0 + toward + torch.linalg.lstsq(x, y, driver="gelsd").solution.mT


def _objective_dense(w: torch.Tensor, xs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    w = w.to(torch.float64)
    return float(sum(((w - t) @ x.mT).square().sum() for x, t in zip(xs, targets)))


@pytest.mark.parametrize(("rows", "duplicate", "row_rank"), [
    ([200, 150, 90], False, None),  # more rows than inputs: G full rank (dense Gram path)
    ([10, 7, 5], False, None),      # 22 < 32 rows in all: G rank deficient (row-space path)
    ([12, 40], True, None),         # a concept given twice
    ([3], False, None),             # one concept, a handful of rows
    ([60, 80], False, 5),           # many rows, each concept of rank 5: dense and rank deficient
])
@pytest.mark.parametrize("ridge", [1e-8, 0.0])
@pytest.mark.parametrize("prior", ["average", "base"])
def test_exact_matches_dense_least_squares(rows: list[int], duplicate: bool, row_rank: int | None,
                                           ridge: float, prior: str) -> None:
    """With a negligible ridge the solve is least squares, and off the data it is the prior."""
    w0, xs, targets = _problem(rows, seed=len(rows), duplicate_last=duplicate, row_rank=row_rank)
    stats = _stats(w0, xs, targets)
    fused = solve_exact(stats, ridge=ridge, prior=prior)
    reference = _lstsq_reference(w0, xs, targets, prior)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), reference, rtol=0, atol=2e-6)
    # Rows of W restricted to null(G) stay at the prior: the fusion never invents changes off the data.
    x = torch.cat(xs)
    _, sv, vh = torch.linalg.svd(x, full_matrices=True)
    null = vh[int((sv > sv.max() * 1e-10).sum()):]
    if null.numel():
        toward = w0 + prior_delta(stats, prior)
        assert float(((fused.double() - toward) @ null.mT).abs().max()) < 1e-6
        if prior == "average":
            assert float(((toward - w0) @ null.mT).abs().max()) > 1e-3  # the test can tell the priors apart


def test_chunked_streaming_equals_one_shot() -> None:
    w0, xs, targets = _problem([100, 5, 33, 64], seed=3)
    whole = _stats(w0, xs, targets)
    # chunks of 7 cross the "more rows than inputs" switch mid-concept
    chunked = _stats(w0, xs, targets, chunk=7)
    torch.testing.assert_close(chunked.gram, whole.gram, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(chunked.rhs, whole.rhs, rtol=1e-12, atol=1e-10)
    assert chunked.rows == whole.rows == [100, 5, 33, 64]
    torch.testing.assert_close(solve_exact(chunked), solve_exact(whole), rtol=0, atol=1e-6)
    # leading dimensions are flattened like a hook's [batch, tokens, in] input
    shaped = LayerStats(w0)
    for x, t in zip(xs, targets):
        shaped.begin_concept(t)
        shaped.add(x[: (len(x) // 4) * 4].reshape(4, -1, IN))
        shaped.add(x[(len(x) // 4) * 4:])
        shaped.end_concept()
    torch.testing.assert_close(shaped.gram, whole.gram, rtol=1e-12, atol=1e-10)


def test_delta_instead_of_target() -> None:
    """Passing dW_i directly gives the same statistics as W0 + dW_i, and a zero delta is exactly 0."""
    w0, xs, targets = _problem([40, 9], seed=4)
    by_target = _stats(w0, xs, targets)
    by_delta = LayerStats(w0)
    for x, t in zip(xs, targets):
        by_delta.begin_concept(delta=t - w0)
        by_delta.add(x)
        by_delta.end_concept()
    torch.testing.assert_close(by_delta.delta_rhs, by_target.delta_rhs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_delta.rhs, torch.stack(
        [t @ x.mT @ x for x, t in zip(xs, targets)]).sum(0), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="exactly one"):
        by_delta.begin_concept(targets[0], delta=targets[0] - w0)
    unchanged = LayerStats(w0.float())
    unchanged.begin_concept(delta=torch.zeros_like(w0))
    unchanged.add(xs[0])
    unchanged.end_concept()
    assert torch.equal(solve_exact(unchanged), w0.float())


def test_exact_objective_beats_lbfgs_and_weight_averaging() -> None:
    w0, xs, targets = _problem([60, 20, 45], seed=5)
    stats = _stats(w0, xs, targets)
    fused = solve_exact(stats, ridge=1e-8)  # the unregularised minimiser
    trace: list[float] = []
    lbfgs = solve_lbfgs([x.float() for x in xs], w0.float(), [t.float() for t in targets],
                        iterations=200, trace=trace)
    assert 0 < len(trace) <= 200 * 5 // 4
    averaged = weight_average(stats)
    exact_obj, lbfgs_obj, avg_obj = (objective(w, stats) for w in (fused, lbfgs, averaged))
    # well-determined data: the default ridge costs almost nothing
    assert exact_obj <= objective(solve_exact(stats), stats) <= exact_obj * 1.01
    assert exact_obj <= lbfgs_obj * (1 + 1e-9)
    assert exact_obj < avg_obj
    # the objective from Grams is the dense objective
    assert exact_obj == pytest.approx(_objective_dense(fused, xs, targets), rel=1e-9)
    assert lbfgs_obj == pytest.approx(_objective_dense(lbfgs, xs, targets), rel=1e-9)
    # LBFGS reads the same objective from the per-concept factors
    from_stats = solve_lbfgs(stats, iterations=200)
    assert objective(from_stats, stats) == pytest.approx(lbfgs_obj, rel=1e-3)


def test_authors_loss_normalisation_and_best_iterate() -> None:
    """The first closure call is at W0 and reports the mean over all rows x outputs."""
    w0, xs, targets = _problem([9, 4], seed=6)
    trace: list[float] = []
    solve_lbfgs(xs, w0, targets, iterations=3, trace=trace)
    rows = sum(len(x) for x in xs)
    assert trace[0] == pytest.approx(_objective_dense(w0, xs, targets) / (rows * OUT), rel=1e-5)
    assert len(trace) <= 3 * 5 // 4


def test_relative_errors_fused_below_averaging_for_every_concept() -> None:
    """Concepts whose activations live in different subspaces (as real concepts do) keep their own
    behaviour under fusion; weight averaging dilutes each to about 1/n."""
    gen = torch.Generator().manual_seed(11)
    out, width, n_concepts, sub = 48, 64, 4, 12
    w0 = torch.randn(out, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
    basis = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64)).Q
    shared = basis[:, n_concepts * sub:n_concepts * sub + 8]  # e.g. "photo of a": every concept sees it
    xs, targets = [], []
    for i in range(n_concepts):
        own = basis[:, i * sub:(i + 1) * sub]
        coeff = torch.randn(150, sub, generator=gen, dtype=torch.float64)
        common = torch.randn(150, 8, generator=gen, dtype=torch.float64)
        noise = torch.randn(150, width, generator=gen, dtype=torch.float64) * 0.05
        xs.append(coeff @ own.mT + common @ shared.mT + noise)
        up = torch.randn(out, 4, generator=gen, dtype=torch.float64) * 0.2
        targets.append(w0 + up @ own[:, :4].mT)
    stats = _stats(w0, xs, targets, chunk=64)
    fused_err = relative_errors(solve_exact(stats), stats)
    avg_err = relative_errors(weight_average(stats), stats)
    assert len(fused_err) == n_concepts
    for fused, averaged in zip(fused_err, avg_err):
        assert fused < averaged
        assert fused < 0.2
        assert averaged > 0.5
    # the starting point loses each concept's change entirely
    assert relative_errors(w0, stats) == pytest.approx([1.0] * n_concepts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_activations_accumulate_in_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    # values around 100: x^T x over 400 rows reaches ~4e6, far past float16's 65504
    x = (torch.randn(400, IN, generator=gen) * 100).to(dtype)
    w0 = torch.zeros(OUT, IN, dtype=dtype)
    stats = LayerStats(w0)
    stats.begin_concept(torch.ones(OUT, IN))
    for part in x.split(50):
        stats.add(part)
    stats.end_concept()
    assert stats.gram.dtype == stats.rhs.dtype == torch.float64
    exact = x.double().mT @ x.double()
    torch.testing.assert_close(stats.gram, exact, rtol=1e-13, atol=0)
    assert bool(torch.isfinite(stats.gram).all())


@pytest.mark.parametrize("rows", [50, 10])  # more rows than inputs (dense Gram) / fewer (row factors)
def test_memory_is_flat_in_the_number_of_concepts(rows: int) -> None:
    out, width = 40, 32
    # dense G and S, at most `in` rows of unfolded factors, the open concept's rows or Gram and its
    # delta, the W0 copy and the delta sum (float32): documented as ~3 in^2 + 4 out*in float64
    bound = 8 * (3 * width * width + 4 * out * width) + 64

    def run(n_concepts: int) -> tuple[int, int]:
        w0, xs, targets = _problem([rows] * n_concepts, seed=n_concepts, out=out, width=width)
        stats = LayerStats(w0.float(), keep_per_concept=False)
        peak = stats.nbytes()
        for x, t in zip(xs, targets):
            stats.begin_concept(t)
            for part in x.split(10):
                stats.add(part)
                peak = max(peak, stats.nbytes())
            stats.end_concept()
            peak = max(peak, stats.nbytes())
        assert stats.concepts == []
        return stats.nbytes(), peak

    results = {n: run(n) for n in (1, 2, 12, 40)}
    assert all(peak <= bound for _, peak in results.values())
    assert results[12] == results[40]  # once dense, nothing grows
    if rows > width:
        assert results[2] == results[12]


def test_few_rows_are_stored_once() -> None:
    """With per-concept statistics and few rows (text encoder, to_k/to_v) the row factors are the
    only copy: no dense in x in Gram is allocated at all."""
    w0, xs, targets = _problem([6, 6, 6], seed=13)
    stats = _stats(w0.float(), xs, targets)
    factors = sum(c.factor.numel() + c.projected_delta.numel() for c in stats.concepts) * 8
    fixed = OUT * IN * 4 * 2 + 8  # W0 copy, float32 delta sum, energy scalar
    assert stats.nbytes() == factors + fixed
    torch.testing.assert_close(stats.gram, sum(x.mT @ x for x in xs))


def test_per_concept_statistics_are_no_larger_than_the_rows() -> None:
    w0, xs, targets = _problem([6, 500], seed=8)
    stats = _stats(w0, xs, targets, chunk=100)
    few, many = stats.concepts
    assert tuple(few.factor.shape) == (6, IN) and tuple(few.projected_delta.shape) == (OUT, 6)
    assert tuple(many.factor.shape) == (IN, IN) and tuple(many.projected_delta.shape) == (OUT, IN)
    # a concept with repeated rows keeps only the directions it populated
    w0, xs, targets = _problem([3], seed=9)
    repeated = xs[0].repeat(20, 1)  # 60 rows > 32 inputs, rank 3
    stats = _stats(w0, [repeated], targets)
    assert stats.concepts[0].factor.shape[0] <= IN
    torch.testing.assert_close(stats.concepts[0].factor.mT @ stats.concepts[0].factor,
                               repeated.mT @ repeated, rtol=1e-9, atol=1e-8)


def test_aggregate_objective_matches_per_concept_objective() -> None:
    w0, xs, targets = _problem([70, 10], seed=10)
    kept = _stats(w0, xs, targets)
    lean = _stats(w0, xs, targets, keep_per_concept=False)
    for w in (solve_exact(kept), weight_average(kept), w0):
        assert objective(w, lean) == pytest.approx(objective(w, kept), rel=1e-9)
    torch.testing.assert_close(solve_exact(lean), solve_exact(kept))
    with pytest.raises(ValueError, match="keep_per_concept"):
        relative_errors(w0, lean)


def test_weight_average_and_degenerate_concepts() -> None:
    w0, xs, targets = _problem([5, 5, 5], seed=12)
    w0 = w0.float().double()  # a float32 base, as in a real model: the float32 result can equal it
    stats = _stats(w0, xs, targets)
    expected = w0 + sum(t - w0 for t in targets) / 3
    torch.testing.assert_close(weight_average(stats).double(), expected, rtol=0, atol=1e-6)
    # no activations at all: nothing moves W off the prior
    empty = LayerStats(w0)
    empty.begin_concept(targets[0])
    empty.end_concept()
    assert empty.rows == [0]
    torch.testing.assert_close(solve_exact(empty), targets[0].float())
    torch.testing.assert_close(solve_exact(empty, prior="base"), w0.float())
    assert relative_errors(w0, empty) == [0.0]
    # a concept that changes nothing and is kept exactly reports 0, not nan
    same = _stats(w0, xs[:1], [w0])
    fused = solve_exact(same)
    assert relative_errors(fused, same) == [0.0]
    assert relative_errors(fused + 1, same) == [math.inf]


def test_misuse_is_reported() -> None:
    w0 = torch.zeros(OUT, IN)
    stats = LayerStats(w0)
    with pytest.raises(RuntimeError, match="begin_concept"):
        stats.add(torch.zeros(3, IN))
    with pytest.raises(ValueError, match="target shape"):
        stats.begin_concept(torch.zeros(IN, OUT))
    stats.begin_concept(w0)
    with pytest.raises(ValueError, match="features"):
        stats.add(torch.zeros(3, IN + 1))
    with pytest.raises(RuntimeError, match="still open"):
        solve_exact(stats)
    with pytest.raises(RuntimeError, match="another concept"):
        stats.begin_concept(w0)
    stats.add(torch.full((2, IN), float("nan")))
    stats.end_concept()
    with pytest.raises(ValueError, match="not finite"):
        solve_exact(stats)


def test_streaming_under_inference_mode() -> None:
    """Hosts sample under torch.inference_mode/no_grad; the statistics must still solve (and feed
    the autograd-based LBFGS reference) outside it."""
    w0, xs, targets = _problem([20, 50], seed=14)
    stats = LayerStats(w0)
    with torch.inference_mode():
        for x, t in zip(xs, targets):
            stats.begin_concept(t)
            for part in x.split(16):
                stats.add(part.clone())
            stats.end_concept()
    reference = _stats(w0, xs, targets)
    torch.testing.assert_close(solve_exact(stats), solve_exact(reference))
    assert objective(solve_lbfgs(stats, iterations=5), stats) < objective(w0, stats)
    stats.begin_concept(targets[0])
    stats.add(xs[0])
    stats.end_concept()
    assert stats.rows == [20, 50, 20]


@pytest.mark.parametrize("rows", [[10, 7, 5], [200, 150, 90]])
def test_spilled_report_statistics_match_and_leave_memory(tmp_path, rows: list[int]) -> None:
    """Report statistics spilled to files give the same solve and report as kept ones, and the
    memory held no longer grows with the number of concepts."""
    w0, xs, targets = _problem(rows, seed=5)
    kept = _stats(w0, xs, targets, per_concept_dtype=torch.float32)
    held: list[int] = []
    spilled = _stats(w0, xs, targets, spill_to=tmp_path, held=held, per_concept_dtype=torch.float32)
    assert len(list(tmp_path.iterdir())) == len(rows)
    w = solve_exact(spilled)
    torch.testing.assert_close(w, solve_exact(kept))
    torch.testing.assert_close(torch.tensor(relative_errors(w, spilled)), torch.tensor(relative_errors(w, kept)))
    assert spilled.nbytes() < kept.nbytes()
    assert max(held) <= (3 * IN * IN + 4 * OUT * IN) * 8  # bounded whatever the number of concepts
    with pytest.raises(RuntimeError, match="float64"):
        _stats(w0, xs, targets).spill(tmp_path)


def test_dense_statistics_are_the_same_size_for_any_number_of_concepts(tmp_path) -> None:
    sizes = []
    for n in (2, 8):
        w0, xs, targets = _problem([10] * n, seed=n)
        stats = _stats(w0, xs, targets, spill_to=tmp_path, per_concept_dtype=torch.float32, dense=True)
        sizes.append(stats.nbytes())
        reference = _lstsq_reference(w0, xs, targets, "average").float()
        torch.testing.assert_close(solve_exact(stats, ridge=1e-8), reference, rtol=1e-4, atol=1e-4)
        # the dense path and the row-space path (same rows, kept as factors) give the same solve
        rows = _stats(w0, xs, targets)
        torch.testing.assert_close(solve_exact(stats), solve_exact(rows), rtol=1e-5, atol=1e-6)
    assert sizes[0] == sizes[1]


# ------------------------------------------------------------------------- a well-posed solve
def _near_duplicates(seed: int, rows: int = 60, spread: float = 1e-3, n: int = 2, width: int = IN,
                     shared_rank: int = 6) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Concepts whose inputs are almost the same rows of low rank (a shared prompt prefix,
    consecutive sampling steps) plus a small concept-specific drift, and whose targets differ: the
    drift directions are weakly determined, and fitting the targets exactly along them takes
    weights far larger than any concept's change."""
    gen = torch.Generator().manual_seed(seed)
    w0, _, targets = _problem([1] * n, seed=seed, width=width)
    shared = (torch.randn(rows, shared_rank, generator=gen, dtype=torch.float64)
              @ torch.randn(shared_rank, width, generator=gen, dtype=torch.float64))
    xs = [shared + spread * torch.randn(rows, width, generator=gen, dtype=torch.float64) for _ in range(n)]
    return w0, xs, targets


def _change_ratio(w: torch.Tensor, w0: torch.Tensor, targets: list[torch.Tensor]) -> float:
    """||W - W0||_F over all concepts' changes together."""
    return float((w.double() - w0).norm() / sum((t - w0).norm() for t in targets))


def _report_only(stats: LayerStats, xs: list[torch.Tensor], targets: list[torch.Tensor]) -> LayerStats:
    """Validation or held-out statistics of rows `xs` next to `stats`."""
    extra = LayerStats.held_out_for(stats)
    for x, t in zip(xs, targets):
        extra.begin_concept(t)
        extra.add(x)
        extra.end_concept()
    return extra


def test_near_duplicate_inputs_stay_near_the_concepts() -> None:
    """The damage in miniature: the unregularised least-squares fit moves W hundreds of times
    further than all the concepts' changes and loses every concept on fresh rows of the same kind;
    the default solve, with or without validation rows, stays within the bound and does as well
    as averaging there."""
    w0, xs, targets = _near_duplicates(seed=21)
    stats = _stats(w0, xs, targets)
    held = _report_only(stats, _near_duplicates(seed=22)[1], targets)
    valid = _report_only(stats, _near_duplicates(seed=23)[1], targets)
    loose = solve_exact(stats, ridge=1e-8, prior="base", max_change=None)
    averaged = weight_average(stats)
    assert _change_ratio(loose, w0, targets) > 50
    assert min(relative_errors(loose, held)) > 5
    # the old report's in-sample view saw nothing wrong: below averaging for every concept
    assert all(a < b for a, b in zip(relative_errors(loose, stats), relative_errors(averaged, stats)))
    info: dict = {}
    for fused in (solve_exact(stats), solve_exact(stats, validation=valid, info=info)):
        assert _change_ratio(fused, w0, targets) < 1.0
        new, avg = relative_errors_many([fused, averaged], held)
        assert max(new) < 1.0 and new == pytest.approx(avg, rel=2e-2)  # the drift carries nothing more
    assert info["ridge"] > min(RIDGES)  # validation saw the weakest ridge's fit fail on fresh rows


CASES = ["near-duplicates", "few rows", "low rank", "many concepts"]


def _case(case: str) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    if case == "near-duplicates":
        return _near_duplicates(seed=24, spread=1e-2)
    if case == "few rows":
        return _near_duplicates(seed=25, rows=12, spread=3e-2)  # 24 < 32 rows: row-space path
    if case == "low rank":
        return _problem([80, 80], seed=26, row_rank=6)
    return _near_duplicates(seed=27, rows=40, spread=1e-2, n=6)


@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("case", CASES)
def test_distance_from_the_prior_has_a_proven_bound(case: str, refine: int) -> None:
    """Without the trust region: ||W - P||_F <= c sqrt(lambda_max(G) / lam) sum_i ||dW_i - Dp||_F,
    lam = ridge tr(G) / in, c = 0.5 (refine 0) or 1.005 (refine 2)."""
    w0, xs, targets = _case(case)
    stats = _stats(w0, xs, targets)
    toward = w0 + prior_delta(stats)
    gram = stats.gram
    disagreement = float(sum((t - toward).norm() for t in targets))
    c = 0.5 if refine == 0 else 1.005
    for ridge in (RIDGE, 1e-3):
        w = solve_exact(stats, ridge=ridge, refine=refine, max_change=None).double()
        lam = ridge * float(gram.diagonal().sum()) / IN
        bound = c * math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]) / lam) * disagreement
        assert float((w - toward).norm()) <= bound
    if case == "near-duplicates":  # the bound excludes what the unregularised fit does here
        loose = solve_exact(stats, ridge=1e-8, max_change=None).double()
        lam = RIDGE * float(gram.diagonal().sum()) / IN
        assert float((loose - toward).norm()) > c * math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]) / lam) * disagreement


@pytest.mark.parametrize("case", CASES)
def test_trust_region_caps_the_change_for_any_data(case: str) -> None:
    """Whatever the data and ridge, ||W - W0||_F <= MAX_CHANGE * sum_i ||dW_i||_F; the cap acts only
    where the regularised fit alone goes further."""
    w0, xs, targets = _case(case)
    stats = _stats(w0, xs, targets)
    for ridge in (RIDGE, 1e-8, 0.0):
        info: dict = {}
        w = solve_exact(stats, ridge=ridge, info=info)
        assert _change_ratio(w, w0, targets) <= MAX_CHANGE * (1 + 1e-6)
        free = solve_exact(stats, ridge=ridge, max_change=None)
        assert info["capped"] == (_change_ratio(free, w0, targets) > MAX_CHANGE)
        if not info["capped"]:
            torch.testing.assert_close(w, free)
    assert case != "near-duplicates" or info["capped"]  # the unregularised fit needed it


def _subspaces(rows: int, draw: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Two concepts whose inputs live mostly in their own 12-dimensional subspaces (plus isotropic
    noise) and whose LoRAs read them: a fit that generalises. `draw` picks fresh rows of the same
    distributions."""
    gen = torch.Generator().manual_seed(28)
    w0 = torch.randn(OUT, IN, generator=gen, dtype=torch.float64) / math.sqrt(IN)
    basis = torch.linalg.qr(torch.randn(IN, IN, generator=gen, dtype=torch.float64)).Q
    owns = [basis[:, :12], basis[:, 12:24]]
    targets = [w0 + (0.2 * torch.randn(OUT, 4, generator=gen, dtype=torch.float64)) @ own[:, :4].mT for own in owns]
    rows_gen = torch.Generator().manual_seed(100 + draw)
    xs = [torch.randn(rows, 12, generator=rows_gen, dtype=torch.float64) @ own.mT
          + 0.3 * torch.randn(rows, IN, generator=rows_gen, dtype=torch.float64) for own in owns]
    return w0, xs, targets


def test_exact_where_the_data_determine_the_weight() -> None:
    """Well-conditioned inputs and validation rows of the same kind: validation picks the smallest
    ridge and the solve is least squares to 1e-6; the fixed default ridge (no validation) is within
    1 % (iterated-Tikhonov residual (lam / (e + lam))^3), plain Tikhonov visibly further."""
    w0, xs, targets = _subspaces(400, draw=0)
    stats = _stats(w0, xs, targets)
    valid = _report_only(stats, _subspaces(400, draw=1)[1], targets)
    reference = _lstsq_reference(w0, xs, targets)
    scale = float((reference - w0).norm())
    info: dict = {}
    chosen = solve_exact(stats, validation=valid, info=info).double()
    assert info["ridge"] == min(RIDGES) and not info["capped"]
    assert float((chosen - reference).norm()) < 1e-6 * scale
    assert float((solve_exact(stats).double() - reference).norm()) < 1e-2 * scale
    assert float((solve_exact(stats, refine=0).double() - reference).norm()) > 3e-2 * scale


def test_solve_is_invariant_to_the_scale_of_the_activations() -> None:
    """lam follows the data's own scale: louder activations (fp16 layers, another base model) and
    more rows of the same kind give the same weights."""
    w0, xs, targets = _near_duplicates(seed=28, spread=1e-2)
    base = solve_exact(_stats(w0, xs, targets))
    louder = solve_exact(_stats(w0, [1e3 * x for x in xs], targets))
    repeated = solve_exact(_stats(w0, [torch.cat([x, x]) for x in xs], targets))
    torch.testing.assert_close(louder, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(repeated, base, rtol=1e-5, atol=1e-6)


def test_held_out_statistics_measure_without_entering_the_solve(tmp_path) -> None:
    """Held-out statistics share W0 with the solve's, give the errors of their own rows, can be
    spilled, and hold no G or S."""
    w0, xs, targets = _problem([50, 20], seed=29)
    _, fresh, _ = _problem([30, 70], seed=30)
    stats = _stats(w0, xs, targets)
    held = LayerStats.held_out_for(stats)
    for x, t in zip(fresh, targets):
        held.begin_concept(delta=t - w0)
        for part in x.split(16):
            held.add(part)
        if len(x) > IN:  # an open float32 Gram: half the solve's float64 one, while the concept records
            assert held._concept_gram.dtype == torch.float32
        held.end_concept()
    held.spill(tmp_path)
    assert held.w0.data_ptr() == stats.w0.data_ptr() and held.rows == [30, 70]
    assert held.nbytes() < sum(x.numel() for x in fresh) * 8 + 1024  # no W0 copy, no Gram, no delta sum
    w = solve_exact(stats)
    direct = [float(((w.double() - t) @ x.mT).norm() / ((t - w0) @ x.mT).norm()) for x, t in zip(fresh, targets)]
    assert relative_errors(w, held) == pytest.approx(direct, rel=1e-5)
    assert held.delta_norms == pytest.approx([float((t - w0).norm()) for t in targets])
    with pytest.raises(RuntimeError, match="report-only"):
        solve_exact(held)
    with pytest.raises(RuntimeError, match="report-only"):
        weight_average(held)


def test_stacking_baseline_adds_every_concept_change():
    """LoRA stacking is W0 + sum_i dW_i, so concept 1's relative error under it is exactly what the
    other concept's change does to concept 1's outputs, ||dW_2 X_1|| / ||dW_1 X_1||."""
    from lib_mos.fusion.solver import weight_stack

    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    deltas = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    rows = [torch.randn(20, 7, generator=gen, dtype=torch.float64) for _ in range(2)]
    stats = LayerStats(w0)
    for d, x in zip(deltas, rows):
        stats.begin_concept(delta=d)
        stats.add(x)
        stats.end_concept()
    stacked = weight_stack(stats)
    torch.testing.assert_close(stacked.double(), w0 + deltas[0] + deltas[1], rtol=1e-6, atol=1e-6)
    errors = relative_errors(stacked, stats)
    for i, j in ((0, 1), (1, 0)):
        want = float(torch.linalg.vector_norm(rows[i] @ deltas[j].T) / torch.linalg.vector_norm(rows[i] @ deltas[i].T))
        assert errors[i] == pytest.approx(want, rel=1e-5)
