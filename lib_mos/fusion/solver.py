"""Gradient fusion, solved from streamed statistics.

For one linear layer the fused weight minimises sum_i ||W X_i - W_i X_i||_F^2 (W_i = W0 + dW_i is
concept i's weight, X_i the layer's inputs while concept i's own model runs). The objective is
quadratic in W, so its minimiser solves the normal equations W G = R with G = sum_i X_i X_i^T and
R = sum_i W_i X_i X_i^T. The authors instead store every activation and run 500 LBFGS iterations
per layer; G and R can be accumulated while activations stream past a forward hook, so memory does
not grow with the number of concepts or sampling steps, and one Cholesky solve replaces the
optimiser. The recorded inputs are highly correlated (a shared prompt prefix, consecutive sampling
steps), so G has weakly determined directions where the exact fit would chase the concepts'
disagreement with huge weights; `solve_exact` is therefore regularised toward the weight average
with a strength tied to G's mean eigenvalue, exact where the data determine W and the average
where they do not, and its change from the base is capped (a trust region). Held-out inputs go into report-only statistics (`LayerStats.held_out_for`).

Conventions: activations are passed as rows, x [..., in] (the transpose of X_i above), exactly
what a forward hook on nn.Linear sees. All statistics are float64 so fp16/bf16 activations lose
nothing while they are summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ConceptStats",
    "LayerStats",
    "SpilledConceptStats",
    "objective",
    "prior_delta",
    "relative_errors",
    "relative_errors_many",
    "solve_exact",
    "solve_lbfgs",
    "weight_average",
    "weight_stack",
]

_F64 = torch.float64


@dataclass(frozen=True)
class ConceptStats:
    """What the per-concept report needs from one concept, in the smallest exact form we found.

    `factor` F [k, in] satisfies F^T F = X_i X_i^T with k = min(rows, in): the raw activation rows
    while the concept has at most `in` of them (exact, in the dtype they arrived in — fp16 rows
    stay fp16 without loss — and smaller than a Gram), otherwise the
    Cholesky factor of the concept's Gram (eigen-factor with zero directions dropped when the Gram
    is singular). `projected_delta` Q = dW_i F^T [out, k]. Then ||(W - W_i) X_i||^2 =
    ||(W - W0) F^T - Q||^2 for every W, with no cancellation and without keeping W_i itself:
    k (in + out) numbers instead of in^2 + out * in. A streaming QR of the rows would give the same
    k but costs more per chunk than the Gram we accumulate anyway, and the solve only ever sees Gram
    precision.
    """

    rows: int
    factor: Tensor
    projected_delta: Tensor

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.factor, self.projected_delta


class SpilledConceptStats:
    """A finished concept's report statistics kept in a file and read back on access, so memory
    stays flat in the number of concepts (the solve itself only needs the dense G and S)."""

    def __init__(self, stats: ConceptStats, path: Path, device: torch.device) -> None:
        from safetensors.torch import save_file

        save_file({"factor": stats.factor.contiguous().cpu(),
                   "projected_delta": stats.projected_delta.contiguous().cpu()}, str(path))
        self.rows = stats.rows
        self.path = path
        self.device = device

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(factor, projected_delta) in one read of the file."""
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor("factor").to(self.device), f.get_tensor("projected_delta").to(self.device)

    @property
    def factor(self) -> Tensor:
        return self.tensors()[0]

    @property
    def projected_delta(self) -> Tensor:
        return self.tensors()[1]


def _psd_factor(gram: Tensor) -> Tensor:
    """F with F^T F = gram for a positive semi-definite float64 Gram; F has rank(gram) rows at most."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return chol.mT.contiguous()
    # Singular (e.g. repeated rows): keep only the directions the concept actually populated.
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > evals.abs().max() * gram.shape[0] * torch.finfo(_F64).eps
    return (evals[keep].sqrt().unsqueeze(1) * evecs[:, keep].mT).contiguous()


class LayerStats:
    """Streaming fusion statistics of one linear layer, fed by `begin_concept`/`add`/`end_concept`.

    The solve needs G = sum_i X_i X_i^T [in, in], S = sum_i dW_i G_i [out, in] (float64; the
    normal equations' R = sum_i W_i G_i = S + W0 G is the `rhs` property — S is kept instead
    because it is exactly zero for a concept that changes nothing and does not cancel against the
    much larger W0 G) and, for the objective, the scalar sum_i ||dW_i X_i||^2.

    Storage is whichever form is smaller, so memory never grows past O(in^2 + out * in):
    - A concept with at most `in` rows is kept as its row factor (F, Q) = (X_i^T, dW_i X_i): the
      text-encoder and to_k/to_v stages see ~176 and 6 rows per concept, far below a Gram's size.
      Without `keep_per_concept` such factors are folded into dense G and S once they add up to
      more than `in` rows; with it (float64) they double as the per-concept report statistics and
      G, S are assembled from them at solve time, so nothing is stored twice.
    - A concept with more rows (spatial layers: thousands per sampling step) is accumulated as its
      own Gram while it streams and then folded into dense G and S (or, kept per concept, into a
      factor of its Gram: see `ConceptStats`).
    Also held: a copy of W0 and the float32 sum of the deltas (for the weight-average baseline).
    While a concept is open: its dW_i and either its raw rows (up to `in`) or its Gram, never both.
    Without `keep_per_concept` that is at most about 3 in^2 + 4 out * in float64 numbers whatever
    the number of concepts or rows; `nbytes()` reports the actual figure.
    """

    def __init__(self, w0: Tensor, *, device: torch.device | str | None = None,
                 keep_per_concept: bool = True, per_concept_dtype: torch.dtype = _F64,
                 dense: bool = False, report_only: bool = False, balanced: bool = False) -> None:
        if w0.dim() != 2:
            raise ValueError(f"w0 must be a 2-D [out, in] weight, got shape {tuple(w0.shape)}")
        if not w0.is_floating_point():
            raise TypeError(f"w0 must be a float tensor, got {w0.dtype}")
        self.device = torch.device(device) if device is not None else w0.device
        self.out_features, self.in_features = (int(s) for s in w0.shape)
        if report_only and not keep_per_concept:
            raise ValueError("report_only statistics are the per-concept ones: keep_per_concept must be True")
        self.keep_per_concept = keep_per_concept
        # report_only: held-out activations, measured but never solved from, so no G or S at all
        self.report_only = report_only
        # dense: fold every concept into G and S at once, so memory is the same for 1 or 100
        # concepts (raw rows are smaller while few, but grow with every concept up to `in` rows)
        self.dense = dense
        self.per_concept_dtype = per_concept_dtype
        # A copy: the caller may swap LoRAs into the live weight in place while we stream (report-only
        # statistics are made from another LayerStats' copy by `held_out_for` and share it).
        self.w0 = w0.detach().to(device=self.device, copy=not report_only)
        self.rows: list[int] = []
        self.delta_norms: list[float] = []  # ||dW_i||_F, for the report's distance from the base
        self.concepts: list[ConceptStats | SpilledConceptStats] = []
        self.delta_energy = torch.zeros((), dtype=_F64, device=self.device)
        # per-concept float64 factors are the solve's statistics too: no dense copy needed
        # balanced: concept i's rows weigh c_i in G and S (`concept_weights`), known only once every
        # concept has streamed, so G and S are assembled from the per-concept factors at solve time
        self.balanced = balanced and not report_only
        if self.balanced and not keep_per_concept:
            raise ValueError("balanced statistics need the per-concept factors: keep_per_concept must be True")
        self.energies: list[float] = []  # ||dW_i X_i||^2 per concept (with the factors kept)
        self._factors_are_stats = keep_per_concept and (per_concept_dtype == _F64 or self.balanced) \
            and not report_only
        self._gram: Tensor | None = None  # dense parts, created on first need
        self._delta_rhs: Tensor | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []  # row factors not yet folded into the dense parts
        self._pending_rows = 0
        self._delta_sum = torch.zeros((0, 0) if report_only else (self.out_features, self.in_features),
                                      dtype=torch.float32, device=self.device)
        self._delta: Tensor | None = None
        self._buffer: list[Tensor] | None = None
        self._buffer_rows = 0
        self._concept_gram: Tensor | None = None
        self._concept_rows = 0

    @classmethod
    def held_out_for(cls, stats: LayerStats) -> LayerStats:
        """Report-only statistics for held-out activations of the same layer, sharing `stats`' copy of
        W0 (held-out rows must not shape the solve, only measure it)."""
        return cls(stats.w0, device=stats.device, per_concept_dtype=stats.per_concept_dtype, report_only=True)

    # ------------------------------------------------------------------------------- accessors
    @property
    def concept_count(self) -> int:
        return len(self.rows)

    @property
    def is_open(self) -> bool:
        return self._delta is not None

    @property
    def gram(self) -> Tensor:
        """G = sum_i X_i X_i^T (float64, assembled on each access)."""
        return self._assemble()[0]

    @property
    def delta_rhs(self) -> Tensor:
        """S = sum_i dW_i G_i (float64, assembled on each access)."""
        return self._assemble()[1]

    @property
    def rhs(self) -> Tensor:
        """R = sum_i W_i G_i = S + W0 G, the right-hand side of the normal equations W G = R."""
        gram, delta_rhs = self._assemble()
        return delta_rhs + self.w0.to(_F64) @ gram

    def _assemble(self) -> tuple[Tensor, Tensor]:
        """Dense (G, S) from the dense parts plus the factors not folded into them."""
        self._require_closed("LayerStats statistics")
        if self.report_only:
            raise RuntimeError("report-only (held-out) statistics hold no G or S to solve from")
        shape_g, shape_s = (self.in_features, self.in_features), (self.out_features, self.in_features)
        gram = self._gram.clone() if self._gram is not None else torch.zeros(
            shape_g, dtype=_F64, device=self.device)
        delta_rhs = self._delta_rhs.clone() if self._delta_rhs is not None else torch.zeros(
            shape_s, dtype=_F64, device=self.device)
        for factor, projected in self._row_factors():
            factor = factor.to(_F64)
            gram.addmm_(factor.mT, factor)
            delta_rhs.addmm_(projected.to(_F64), factor)
        return gram, delta_rhs

    def _row_factors(self) -> list[tuple[Tensor, Tensor]]:
        """The (F, Q) pairs not contained in the dense parts (balanced: scaled by sqrt(c_i))."""
        if self._factors_are_stats:
            pairs = [c.tensors() for c in self.concepts]
            if self.balanced:
                pairs = [(f * math.sqrt(w), q * math.sqrt(w)) for (f, q), w in zip(pairs, self.concept_weights())]
            return pairs
        return self._pending

    def concept_weights(self) -> list[float]:
        """Balanced statistics: the weight c_i of concept i's rows, so that the solve minimises
        sum_i c_i ||(W - W_i) X_i||^2 = the sum of squared relative errors (c_i = 1/||dW_i X_i||^2):
        every concept counts alike whatever the size of its change or its number of rows. A concept
        that does not change this layer (its target is W0 here) gets the mean total weight of the
        others, c_i = mean_j(c_j n_j) / n_i. Unbalanced: all 1."""
        if not self.balanced:
            return [1.0] * self.concept_count
        changing = [(n, 1.0 / e) for n, e in zip(self.rows, self.energies) if e > 0]
        share = sum(n * c for n, c in changing) / len(changing) if changing else 1.0
        return [1.0 / e if e > 0 else (share / n if n else 0.0) for n, e in zip(self.rows, self.energies)]

    def _dense(self) -> tuple[Tensor, Tensor]:
        if self._gram is None or self._delta_rhs is None:
            self._gram = torch.zeros(self.in_features, self.in_features, dtype=_F64, device=self.device)
            self._delta_rhs = torch.zeros(self.out_features, self.in_features, dtype=_F64,
                                          device=self.device)
        return self._gram, self._delta_rhs

    # ------------------------------------------------------------------------------- streaming
    def begin_concept(self, target: Tensor | None = None, *, delta: Tensor | None = None,
                      copy: bool = True) -> None:
        """Start a concept whose activations follow: `target` is its full weight W_i = W0 + dW_i, or
        pass `delta` = dW_i instead (exact when the LoRA product is at hand, no W0 + dW rounding).
        copy=False keeps a float64 `delta` by reference (the caller leaves it unchanged until
        end_concept), so training and held-out statistics can share one copy."""
        if self._delta is not None:
            raise RuntimeError("begin_concept() called while another concept is open; call end_concept()")
        if (target is None) == (delta is None):
            raise ValueError("begin_concept() takes exactly one of target= and delta=")
        given = target if target is not None else delta
        assert given is not None
        if tuple(given.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{'target' if target is not None else 'delta'} shape {tuple(given.shape)} "
                             f"does not match w0 {(self.out_features, self.in_features)}")
        given = given.detach().to(device=self.device, dtype=_F64, copy=copy)
        self._delta = given - self.w0.to(_F64) if target is not None else given
        self._buffer = []
        self._buffer_rows = 0
        self._concept_gram = None
        self._concept_rows = 0

    def add(self, x: Tensor) -> None:
        """Accumulate input rows x [..., in] of the open concept (any float dtype, any device)."""
        if self._delta is None:
            raise RuntimeError("add() called outside begin_concept()/end_concept()")
        if not x.is_floating_point():
            raise TypeError(f"activations must be floating point, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"activations must end in {self.in_features} features, got shape {tuple(x.shape)}")
        with torch.no_grad():
            rows = x.detach().reshape(-1, self.in_features)
            n = rows.shape[0]
            if n == 0:
                return
            self._concept_rows += n
            if self._buffer is not None and self._buffer_rows + n <= self.in_features:
                # Few rows so far: keep them as they came (an exact factor, smaller than a Gram, and
                # fp16 rows stay fp16 losslessly). copy=True so a caller reusing its activation
                # buffer cannot change what we hold.
                self._buffer.append(rows.to(device=self.device, copy=True))
                self._buffer_rows += n
                return
            # report-only statistics (validation, held-out) only measure errors: a float32 Gram
            # (relative error ~1e-5 over 1e5 rows) halves their memory while a concept records
            dtype = torch.float32 if self.report_only else _F64
            if self._concept_gram is None:
                self._concept_gram = torch.zeros(self.in_features, self.in_features, dtype=dtype,
                                                 device=self.device)
            if self._buffer:
                held = torch.cat([b.to(dtype) for b in self._buffer])
                self._concept_gram.addmm_(held.mT, held)
            self._buffer = None
            rows = rows.to(device=self.device, dtype=dtype)
            self._concept_gram.addmm_(rows.mT, rows)

    def end_concept(self) -> None:
        """Close the open concept: store it in the smaller of row-factor and dense form."""
        delta = self._delta
        if delta is None:
            raise RuntimeError("end_concept() called without begin_concept()")
        with torch.no_grad():
            if self._buffer is not None:
                dtype = _F64
                if self._buffer:
                    dtype = self._buffer[0].dtype
                    for b in self._buffer[1:]:
                        dtype = torch.promote_types(dtype, b.dtype)
                factor = (torch.cat([b.to(dtype) for b in self._buffer]) if self._buffer
                          else torch.zeros(0, self.in_features, dtype=dtype, device=self.device))
                projected = delta @ factor.to(_F64).mT  # dW_i X_i, [out, n]
                self.delta_energy += projected.square().sum()
                if not self._factors_are_stats and not self.report_only:
                    self._pending.append((factor, projected))
                    self._pending_rows += factor.shape[0]
                    if self.dense or self._pending_rows > self.in_features:
                        self._fold_pending()
            else:
                gram_i = self._concept_gram
                assert gram_i is not None
                factor = projected = None
                if self.keep_per_concept:
                    factor = _psd_factor(gram_i.to(_F64))
                    projected = delta @ factor.mT
                    self.delta_energy += projected.square().sum()
                if not self._factors_are_stats and not self.report_only:
                    gram, delta_rhs = self._dense()
                    weighted = delta @ gram_i  # dW_i G_i
                    gram += gram_i
                    delta_rhs += weighted
                    if projected is None:
                        self.delta_energy += (weighted * delta).sum()
                    del weighted
            if self.keep_per_concept:
                assert factor is not None and projected is not None
                dtype = self.per_concept_dtype
                if self._buffer is None:  # a Gram factor; raw rows stay in their own (exact) dtype
                    factor = factor.to(dtype)
                self.concepts.append(ConceptStats(self._concept_rows, factor, projected.to(dtype)))
                self.energies.append(float(projected.to(_F64).square().sum()))
            if not self.report_only:
                self._delta_sum += delta.to(torch.float32)
            self.delta_norms.append(float(torch.linalg.vector_norm(delta)))
            self.rows.append(self._concept_rows)
        self._delta = None
        self._buffer = None
        self._buffer_rows = 0
        self._concept_gram = None
        self._concept_rows = 0

    def spill(self, folder: Path) -> None:
        """Move every finished concept's report statistics into files under `folder` (which must
        outlive this object's use). Only when the solve does not read them (float64 per-concept
        factors double as the solve's statistics: use `per_concept_dtype=torch.float32`)."""
        if self._factors_are_stats and not self.balanced:
            raise RuntimeError("spill() needs per_concept_dtype other than float64 (the solve reads those factors)")
        for i, c in enumerate(self.concepts):
            if isinstance(c, ConceptStats):
                self.concepts[i] = SpilledConceptStats(c, Path(folder) / f"layer{id(self):x}-concept{i}.safetensors",
                                                       self.device)

    def _fold_pending(self) -> None:
        """Row factors now outweigh a dense Gram: sum them into G and S and drop them."""
        gram, delta_rhs = self._dense()
        for factor, projected in self._pending:
            factor = factor.to(_F64)
            gram.addmm_(factor.mT, factor)
            delta_rhs.addmm_(projected, factor)
        self._pending = []
        self._pending_rows = 0

    def nbytes(self) -> int:
        """Bytes of tensor data held right now (for the memory test and the benchmark)."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def held_tensors(self) -> list[Tensor]:
        """The tensors held right now; report-only statistics share W0 and may share the open delta
        with the solve's (count storage once: `data_ptr`)."""
        tensors = [self.delta_energy, self._delta_sum] + ([] if self.report_only else [self.w0])
        tensors += [t for t in (self._gram, self._delta_rhs, self._delta, self._concept_gram) if t is not None]
        tensors += self._buffer or []
        for factor, projected in self._pending:
            tensors += [factor, projected]
        for c in self.concepts:
            if isinstance(c, ConceptStats):
                tensors += [c.factor, c.projected_delta]
        return tensors

    def _require_closed(self, what: str) -> None:
        if self._delta is not None:
            raise RuntimeError(f"{what}: a concept is still open; call end_concept() first")

    def _require_per_concept(self, what: str) -> None:
        if not self.keep_per_concept:
            raise ValueError(f"{what} needs per-concept statistics; build LayerStats(keep_per_concept=True)")


# ------------------------------------------------------------------------------------ solvers
RIDGE = 0.1  # lam / mean eigenvalue of G when no validation inputs choose it
RIDGES = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # the candidates validation inputs choose from
MAX_CHANGE = 1.5
PRIORS = ("average", "base")


def prior_delta(stats: LayerStats, prior: str = "average") -> Tensor:
    """P - W0 (float64): where the data leave W undetermined the fused weight stays at the prior P,
    the weight average W0 + mean_i dW_i ("average": what the concepts agree on, bounded by their
    own changes) or W0 ("base")."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    if prior == "base" or stats.concept_count == 0:
        return torch.zeros(stats.out_features, stats.in_features, dtype=_F64, device=stats.device)
    return stats._delta_sum.to(_F64) / stats.concept_count


def solve_exact(stats: LayerStats, ridge: float = RIDGE, *, refine: int = 2, prior: str = "average",
                max_change: float | None = MAX_CHANGE, validation: LayerStats | None = None,
                ridges: Sequence[float] = RIDGES, info: dict | None = None) -> Tensor:
    """The fused weight (float32): least squares where the data determine it, the prior P where
    they do not.

    Minimises sum_i ||(W - W_i) X_i||^2 + lam ||W - P||^2 with lam = ridge * tr(G) / in, G's mean
    eigenvalue (the data's own scale: louder inputs or more rows of the same kind change nothing).
    With D = W - W0 and Dp = P - W0, E = D - Dp solves E (G + lam I) = sum_i (dW_i - Dp) G_i, what
    each concept wants beyond the prior (float64 Cholesky, one batched solve for all output rows).
    `refine` steps of iterated Tikhonov reuse the factor, so an eigenvalue e of G keeps
    1 - (lam / (e + lam))^(refine + 1) of the least-squares answer: exact where e >> lam, the prior
    where e << lam and on null(G). Without this, near-duplicate inputs with conflicting targets
    (weakly determined directions) get weights many times the concepts' own changes.

    How weak is too weak depends on how well the recorded inputs stand for unseen ones, which the
    scale alone cannot tell: with `validation` (report-only statistics of inputs recorded like the
    training ones, e.g. other prompts and another seed, never solved from) the ridge is chosen per
    layer from `ridges` as the one whose weight has the smallest objective on them; otherwise it is
    `ridge`.

    Trust region: if W still moves further from W0 than `max_change` * sum_i ||dW_i||_F (more
    than stacking every LoRA, with room), lam grows 4x at a time until it does not; ||W - P||
    falls monotonically with lam, so this is the least-squares fit constrained to that ball (None:
    no cap). `info`, if given, receives the ridge, lam, the scale and whether the cap acted. If the
    factorisation fails (ridge 0 with a singular G, or rounding), the same filter is applied in G's
    eigenbasis with a pseudo-inverse cut-off.
    """
    stats._require_closed("solve_exact")
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite non-negative number, got {ridge}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    if max_change is not None and not max_change > 0:
        raise ValueError(f"max_change must be positive or None, got {max_change}")
    w0 = stats.w0.to(_F64)
    toward = prior_delta(stats, prior)
    path = _row_space_filter(stats, refine, toward) if ridge > 0 else None
    delta = path[1](ridge * path[0]) if path is not None else None
    if delta is None:
        path = _dense_filter(stats, refine, toward)
        if path[0] <= 0.0:
            return (w0 + toward).to(torch.float32)  # no activations: nothing moves W off the prior
        delta = path[1](ridge * path[0])
    scale, filtered = path
    if validation is not None and ridges:
        # the solve's own concept weights (balanced statistics) on the validation rows too
        weights = stats.concept_weights() if stats.balanced else None
        ridge = _select_ridge(validation, toward, scale, filtered, weights, ridges)
        delta = filtered(ridge * scale)
    lam, capped = ridge * scale, False
    if max_change is not None:
        room = max(max_change * sum(stats.delta_norms) - float(torch.linalg.vector_norm(toward)), 0.0)
        for _ in range(40):
            if float(torch.linalg.vector_norm(delta)) <= room:
                break
            lam, capped = 4.0 * max(lam, 1e-3 * scale), True
            delta = filtered(lam)
            assert delta is not None  # a larger lam only makes the factorisation safer
    if not bool(torch.isfinite(delta).all()):
        raise FloatingPointError("exact fusion solve produced non-finite weights")
    if info is not None:
        info.update(ridge=ridge, lam=lam, scale=scale, capped=capped)
    return (w0 + toward + delta).to(torch.float32)


SELECTION_ROWS = 128  # output rows the ridge is chosen on (every k-th): lam acts alike on all rows
SELECTION_TOLERANCE = 0.01  # the smallest ridge within 1 % of the best validation objective wins


def _select_ridge(validation: LayerStats, toward: Tensor, scale: float, filtered: Filter, weights: list[float] | None,
                  ridges: Sequence[float]) -> float:
    """The candidate ridge with the smallest sum_i ||(W - W_i) V_i||^2 over the validation inputs
    V_i: the solve's own objective on inputs it did not see (cross-validation; relative errors
    would weigh concepts differently from the fit and favour the prior for that reason alone).
    Shrinking toward the prior always helps a little on a finite sample; the smallest ridge within
    SELECTION_TOLERANCE of the best is taken, so the fit stays exact unless regularising clearly
    pays. Every output row is filtered alike, so the candidates are compared on a stride of
    SELECTION_ROWS output rows (solving only those); each concept is read once."""
    validation._require_closed("validation")
    validation._require_per_concept("validation")
    out = toward.shape[0]
    rows = torch.arange(0, out, max(1, out // SELECTION_ROWS), device=toward.device)
    residuals = []  # (F, Dp F^T - Q) on those rows: (W - W_i) V_i = E F^T + that for W = P + E
    for c, w in zip(validation.concepts, weights or [1.0] * validation.concept_count):
        factor, projected = (t.to(_F64) * math.sqrt(w) for t in c.tensors())
        residuals.append((factor, toward[rows] @ factor.mT - projected[rows]))
    errors = {}
    for ridge in sorted(ridges):
        delta = filtered(ridge * scale, rows)
        if delta is not None:
            errors[ridge] = sum(float((delta @ f.mT + r).square().sum()) for f, r in residuals)
    if not errors:
        raise FloatingPointError("no candidate ridge gave a solvable system")
    best = min(errors.values())
    return min(r for r, e in errors.items() if e <= best * (1 + SELECTION_TOLERANCE))


Filter = Callable[[float, "Tensor | None"], "Tensor | None"]  # (lam, output rows or None) -> E


def _dense_filter(stats: LayerStats, refine: int, toward: Tensor) -> tuple[float, Filter]:
    """(tr(G) / in, lam -> E) from the dense G and S' = S - Dp G."""
    gram, rhs = stats._assemble()  # rhs = S = R - W0 G: zero on null(G) because every G_i is PSD
    if not math.isfinite(float(gram.sum() + rhs.sum())):  # one reduction: any NaN/inf shows up
        raise ValueError("fusion statistics are not finite (NaN/inf in the activations or targets)")
    rhs.sub_(toward @ gram)  # sum_i (dW_i - Dp) G_i
    eigen: list[tuple[Tensor, Tensor]] = []  # G's eigendecomposition, computed once if ever needed

    def filtered(lam: float, rows: Tensor | None = None) -> Tensor:
        target = rhs if rows is None else rhs[rows]
        system = gram.clone()
        system.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(system)
        if int(info) == 0 and lam > 0:
            # iterated Tikhonov E_{k+1} = E_k + (S' - E_k G)(G + lam)^-1 = E_1 + lam E_k (G + lam)^-1
            first = torch.cholesky_solve(target.mT, chol).mT
            delta = first
            for _ in range(refine):
                delta = first + lam * torch.cholesky_solve(delta.mT, chol).mT
            return delta
        if not eigen:
            eigen.append(torch.linalg.eigh(gram))
        evals, evecs = eigen[0]
        evals = evals.clamp_min(0.0)
        cut = evals.max() * gram.shape[0] * torch.finfo(_F64).eps
        safe = torch.where(evals > cut, evals, torch.ones_like(evals))
        shrink = (lam / (safe + lam)) ** (refine + 1) if lam > 0 else torch.zeros_like(evals)
        gain = torch.where(evals > cut, (1.0 - shrink) / safe, torch.zeros_like(evals))
        return ((target @ evecs) * gain) @ evecs.mT

    return float(gram.diagonal().sum()) / stats.in_features, filtered


def _row_space_filter(stats: LayerStats, refine: int, toward: Tensor) -> tuple[float, Filter] | None:
    """The same filter when all data is still N < in raw rows F [N, in], or None.

    Push-through identity: (F^T F + lam I)^-1 F^T = F^T (F F^T + lam I)^-1, so E = A F with
    A = Q' (K + lam I)^-1, K = F F^T [N, N] and Q' = Q - Dp F^T: an N x N Cholesky instead of
    in x in (text encoder with few concepts, every to_k/to_v), and E lies in the rows' span by
    construction. tr(K) = tr(G) sets the same lam. The filter returns None if K + lam I does not
    factor (the caller then takes the dense path).
    """
    if stats._gram is not None or sum(stats.rows) >= stats.in_features:
        return None  # (a factor has at most its concept's rows: no need to read them to know)
    pairs = stats._row_factors()
    count = sum(f.shape[0] for f, _ in pairs)
    if count == 0 or count >= stats.in_features:
        return None
    rows = torch.cat([f.to(_F64) for f, _ in pairs])
    projected = torch.cat([q.to(_F64) for _, q in pairs], dim=1)
    if not math.isfinite(float(rows.sum() + projected.sum())):
        raise ValueError("fusion statistics are not finite (NaN/inf in the activations or targets)")
    projected -= toward @ rows.mT
    kernel = rows @ rows.mT
    scale = float(kernel.diagonal().sum()) / stats.in_features
    if scale <= 0:
        return None

    def filtered(lam: float, out_rows: Tensor | None = None) -> Tensor | None:
        system = kernel.clone()
        system.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            return None
        target = projected if out_rows is None else projected[out_rows]
        first = torch.cholesky_solve(target.mT, chol).mT
        coeff = first
        for _ in range(refine):  # A_{k+1} = A_1 + lam A_k (K + lam I)^-1, the row-space image of E_k
            coeff = first + lam * torch.cholesky_solve(coeff.mT, chol).mT
        return coeff @ rows

    return scale, filtered


def solve_lbfgs(
    stats_or_activations: LayerStats | Sequence[Tensor],
    w0: Tensor | None = None,
    targets: Sequence[Tensor] | None = None,
    *,
    iterations: int = 500,
    history: int = 25,
    lr: float = 1.0,
    trace: list[float] | None = None,
) -> Tensor:
    """The authors' optimiser, kept as the reference the exact solve is measured against.

    As in their gradient_fusion.py: all concepts' rows stacked, loss = mean squared error over all
    rows x outputs (sum_i ||W X_i - W_i X_i||^2 / (N * out)), one `torch.optim.LBFGS.step` with
    lr 1, max_iter = `iterations`, the default max_eval = iterations * 5 // 4 closure calls, history
    25, strong-Wolfe line search, tolerances 1e-16, float32, started at W0, and the returned weight
    is the best one any closure call saw. `stats_or_activations` is either a list of activation
    tensors [..., in] (one per concept, with `targets` the concepts' full weights W_i and `w0`) or a
    LayerStats with per-concept statistics (its factors stand in for the rows: same objective, fewer
    rows). `trace`, if given, receives the loss of every closure call.
    """
    if iterations <= 0:
        raise ValueError(f"iterations must be positive, got {iterations}")
    if isinstance(stats_or_activations, LayerStats):
        stats = stats_or_activations
        stats._require_closed("solve_lbfgs")
        stats._require_per_concept("solve_lbfgs on LayerStats")
        start = stats.w0 if w0 is None else w0
        base = stats.w0.to(_F64)
        inputs = [c.factor.to(torch.float32) for c in stats.concepts]
        outputs = [(c.factor.to(_F64) @ base.mT + c.projected_delta.to(_F64).mT).to(torch.float32)
                   for c in stats.concepts]
        total_rows = sum(stats.rows)
    else:
        activations = list(stats_or_activations)
        if w0 is None or targets is None or len(targets) != len(activations):
            raise ValueError("solve_lbfgs on activations needs w0 and one target weight per activation tensor")
        start = w0
        width = w0.shape[1]
        inputs = [x.detach().reshape(-1, width).to(torch.float32) for x in activations]
        outputs = [x @ t.detach().to(torch.float32).mT for x, t in zip(inputs, targets)]
        total_rows = sum(x.shape[0] for x in inputs)
    weight = start.detach().to(torch.float32).clone()
    if total_rows == 0 or not inputs:
        return weight
    rows = torch.cat(inputs)
    wanted = torch.cat(outputs)
    denominator = float(total_rows * weight.shape[0])

    weight.requires_grad_(True)
    best_loss = math.inf
    best = weight.detach().clone()
    optimizer = torch.optim.LBFGS([weight], lr=lr, max_iter=iterations, history_size=history,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-16,
                                  tolerance_change=1e-16)

    def closure() -> Tensor:
        nonlocal best_loss, best
        optimizer.zero_grad()
        loss = F.mse_loss(F.linear(rows, weight), wanted, reduction="sum") / denominator
        value = float(loss.detach())
        if trace is not None:
            trace.append(value)
        if value < best_loss:
            best_loss = value
            best = weight.detach().clone()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return best


# ------------------------------------------------------------------------------------ measures
def objective(w: Tensor, stats: LayerStats) -> float:
    """sum_i ||(W - W_i) X_i||_F^2, from the per-concept factors when kept (no cancellation), else
    from the aggregates as tr(D G D^T) - 2 tr(D S^T) + sum_i ||dW_i X_i||^2 with D = W - W0."""
    stats._require_closed("objective")
    change = w.detach().to(device=stats.device, dtype=_F64) - stats.w0.to(_F64)
    if stats.keep_per_concept:
        total = torch.zeros((), dtype=_F64, device=stats.device)
        for c in stats.concepts:
            total += (change @ c.factor.to(_F64).mT - c.projected_delta.to(_F64)).square().sum()
        return float(total)
    gram, delta_rhs = stats._assemble()
    value = (change @ gram * change).sum() - 2.0 * (change * delta_rhs).sum() + stats.delta_energy
    return max(float(value), 0.0)


def relative_errors(w: Tensor, stats: LayerStats) -> list[float]:
    """Per concept ||W X_i - W_i X_i|| / ||dW_i X_i||: how much of concept i's own change the fused
    weight loses (0 = kept exactly, 1 = as if the concept's LoRA were dropped). 0/0 reports 0.0."""
    return relative_errors_many([w], stats)[0]


def relative_errors_many(weights: Sequence[Tensor], stats: LayerStats) -> list[list[float]]:
    """`relative_errors` of several weights (e.g. fused and averaged), reading each concept's
    statistics once (they may be spilled to disk)."""
    stats._require_closed("relative_errors")
    stats._require_per_concept("relative_errors")
    changes = [w.detach().to(device=stats.device, dtype=_F64) - stats.w0.to(_F64) for w in weights]
    out: list[list[float]] = [[] for _ in weights]
    for c in stats.concepts:
        factor, projected = (t.to(_F64) for t in c.tensors())
        den = float(torch.linalg.vector_norm(projected))
        for errors, change in zip(out, changes):
            num = float(torch.linalg.vector_norm(change @ factor.mT - projected))
            if den == 0.0:
                errors.append(0.0 if num == 0.0 else math.inf)
            else:
                errors.append(num / den)
    return out


def weight_stack(stats: LayerStats) -> Tensor:
    """LoRA stacking, W0 + sum_i dW_i (float32): every concept applied at once at its weight, what
    users get by putting all the LoRAs in one prompt."""
    stats._require_closed("weight_stack")
    if stats.report_only:
        raise RuntimeError("weight_stack needs the training statistics, not report-only ones")
    return stats.w0.to(torch.float32) + stats._delta_sum


def weight_average(stats: LayerStats) -> Tensor:
    """The naive baseline W0 + mean_i dW_i (float32) that the report compares fusion against."""
    stats._require_closed("weight_average")
    if stats.report_only:
        raise RuntimeError("weight_average needs the training statistics, not report-only ones")
    w0 = stats.w0.to(torch.float32)
    if stats.concept_count == 0:
        return w0.clone()
    return w0 + stats._delta_sum / stats.concept_count
