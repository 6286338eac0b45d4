"""The fusion report: how well the fused weights keep each concept, and whether they can be
trusted.

Per concept and stage: the relative output error ||W X_i - W_i X_i|| / ||dW_i X_i|| of the fused
weights and of weight averaging (0 = the concept's change kept, 1 = as if its LoRA were dropped),
on the recorded inputs and on held-out inputs the solve never saw; how far the fused weights moved
from the base in units of the concept's own change; how many rows the stage recorded against the
layer widths. Values out of the bounds below flag the row and add a warning: a fit of the recorded
samples' noise looks perfect on them and shows only here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from lib_mos.fusion_solver import MAX_CHANGE, LayerStats, relative_errors_many, weight_average

__all__ = ["DISTANCE_BOUND", "HELD_OUT_BOUND", "HELD_OUT_MARGIN", "format_report", "stage_report"]

# Report bounds (README, "The report"). Held-out error 1 is what dropping the concept's LoRA
# scores, so a fused layer set that does worse than that on prompts and noise it did not see is not
# fitting the concept but the recorded samples. The fused change ||W - W0||_F should not exceed all
# the concepts' changes together (stacking every LoRA); a little room is left for exact fits that
# combine the changes along shared inputs.
HELD_OUT_BOUND = 1.0
HELD_OUT_MARGIN = 1.1  # ...and 10 % above averaging's, which with many concepts nears 1 too
DISTANCE_BOUND = MAX_CHANGE  # the exact solve's trust region keeps to it; LBFGS may not


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def stage_report(stage: str, concepts: Sequence[str], stats: dict[str, LayerStats], held: dict[str, LayerStats],
                 fused: dict[str, torch.Tensor], infos: dict[str, dict], warnings: list[str]) -> list[dict]:
    """One row per concept: relative output errors (recorded and held-out inputs, fused and
    averaged; mean over the stage's layers where the concept changes something), the fused change
    ||W - W0||_F relative to the concept's own ||dW_i||_F (worst layer), the rows recorded in the
    layer they cover least, and the solve's choices (median ridge, layers the trust region capped).
    `stats` are the solve's statistics per layer, `held` the held-out ones (empty: none recorded),
    `infos` what the exact solve chose per layer. Out-of-bounds values add a line to `warnings`
    and a flag to the row."""
    if not stats:
        return []
    n = len(concepts)
    err: list[dict[str, list[float]]] = [{"fused": [], "average": [], "held_out": [], "held_out_average": []}
                                         for _ in range(n)]
    distance = [(0.0, "")] * n
    change = (0.0, "")  # worst ||W - W0|| / sum_j ||dW_j|| over the stage's layers
    coverage = [(float("inf"), 0, 0, 0)] * n  # (rows / width, rows, held-out rows, width) of the thinnest layer
    for name, st in stats.items():
        w, avg = fused[name], weight_average(st)
        recorded = relative_errors_many([w, avg], st)
        unseen = relative_errors_many([w, avg], held[name]) if name in held else None
        moved = float(torch.linalg.vector_norm(w.to(torch.float64) - st.w0.to(torch.float64)))
        total = sum(st.delta_norms)
        if total > 0 and moved / total > change[0]:
            change = (moved / total, name)
        for i in range(n):
            ratio = st.rows[i] / st.in_features
            if ratio < coverage[i][0]:
                coverage[i] = (ratio, st.rows[i], held[name].rows[i] if name in held else 0, st.in_features)
            if st.delta_norms[i] == 0:
                continue  # no change of this concept here: its relative error is undefined
            err[i]["fused"].append(recorded[0][i])
            err[i]["average"].append(recorded[1][i])
            if unseen is not None:
                err[i]["held_out"].append(unseen[0][i])
                err[i]["held_out_average"].append(unseen[1][i])
            if moved / st.delta_norms[i] > distance[i][0]:
                distance[i] = (moved / st.delta_norms[i], name)
    ridges = [info["ridge"] for info in infos.values() if "ridge" in info]
    capped = sum(bool(info.get("capped")) for info in infos.values())
    if change[0] > DISTANCE_BOUND:
        warnings.append(f"{stage}: the fused change is {change[0]:.1f}x all concepts' changes together in "
                        f"{change[1]} (bound {DISTANCE_BOUND}x): weights far from the base and the concepts")
    rows = []
    for i, concept in enumerate(concepts):
        row = {"concept": concept, "stage": stage, "layers": len(stats),
               **{k: _mean(v) for k, v in err[i].items()},
               "distance": distance[i][0], "distance_layer": distance[i][1], "change": change[0],
               "rows": coverage[i][1], "held_out_rows": coverage[i][2], "width": coverage[i][3],
               "ridge": statistics.median(ridges) if ridges else None, "capped": capped, "flags": []}
        if not held:
            row["held_out"] = row["held_out_average"] = None
        elif row["held_out"] > max(HELD_OUT_BOUND, HELD_OUT_MARGIN * row["held_out_average"]):
            row["flags"].append("held-out")
            warnings.append(f"{concept} / {stage}: held-out error {row['held_out']:.2f} (bound "
                            f"{HELD_OUT_BOUND}: worse than leaving the concept out; averaging gives "
                            f"{row['held_out_average']:.2f})")
        if change[0] > DISTANCE_BOUND:
            row["flags"].append("distance")
        rows.append(row)
    return rows


def format_report(report: Sequence[dict], warnings: Sequence[str] = ()) -> str:
    """The report as a text table, then the warnings. Errors are relative output errors (0 = the
    concept's change kept, 1 = as if its LoRA were dropped) on the recorded inputs and on held-out
    ones, fused vs weight averaging; distance = ||W - W0|| / ||dW_i|| in the worst layer; rows =
    rows recorded per concept in the layer they cover least, against its input width. A note names
    stages where the trust region acted. Rows of reports written before the held-out check show "-"
    there."""
    def num(value) -> str:
        return f"{value:>9.4f}" if isinstance(value, (int, float)) else f"{'-':>9}"

    lines = [f"{'concept':<16} {'stage':<7} {'layers':>6} {'fused':>9} {'averaged':>9} {'held-out':>9} "
             f"{'averaged':>9} {'distance':>9} {'rows/width':>12}  flags"]
    for r in report:
        distance = f"{r['distance']:.2f}x" if isinstance(r.get("distance"), (int, float)) else "-"
        rows = f"{r['rows']}/{r['width']}" if r.get("width") else "-"
        flags = ("! " + ", ".join(r["flags"])) if r.get("flags") else ""
        lines.append(f"{r['concept'][:16]:<16} {r['stage']:<7} {r['layers']:>6} {num(r['fused'])} {num(r['average'])} "
                     f"{num(r.get('held_out'))} {num(r.get('held_out_average'))} {distance:>9} {rows:>12}  {flags}".rstrip())
    capped = {r["stage"]: (r["capped"], r["layers"]) for r in report if r.get("capped")}
    lines += [f"note: {stage}: the trust region capped {n} of {layers} layers (fused change held at "
              f"{DISTANCE_BOUND}x the concepts' changes)" for stage, (n, layers) in capped.items()]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)
