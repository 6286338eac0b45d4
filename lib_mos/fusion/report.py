"""The fusion report: how well the fused weights keep each concept, and whether they can be
trusted.

Per concept and stage: the relative output error ||W X_i - W_i X_i|| / ||dW_i X_i|| of the fused
weights and of the two things users do without fusion, weight averaging and LoRA stacking (every
LoRA at weight 1 at once) (0 = the concept's change kept, 1 = as if its LoRA were dropped),
on the recorded inputs and on held-out inputs the solve never saw; how far the fused weights moved
from the base in units of the concept's own change; how many rows the stage recorded against the
layer widths. Values out of the bounds below flag the row and add a warning: a fit of the recorded
samples' noise looks perfect on them and shows only here.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lib_mos.fusion import check
from lib_mos.fusion.solver import MAX_CHANGE, LayerStats, relative_errors_many, weight_average, weight_stack

__all__ = ["DISTANCE_BOUND", "HELD_OUT_BOUND", "HELD_OUT_MARGIN", "PICTURE", "LayerMeasure", "concept_summary",
           "format_report", "measure_layers", "stage_report", "verdicts"]

# Report bounds (docs/fusion.md, "The report"). Held-out error 1 is what dropping the concept's LoRA
# scores, so a fused layer set that does worse than that on prompts and noise it did not see is not
# fitting the concept but the recorded samples. The fused change ||W - W0||_F should not exceed all
# the concepts' changes together (stacking every LoRA); a little room is left for exact fits that
# combine the changes along shared inputs.
HELD_OUT_BOUND = 1.0
HELD_OUT_MARGIN = 1.1  # ...and 10 % above averaging's, which with many concepts nears 1 too
DISTANCE_BOUND = MAX_CHANGE  # the exact solve's trust region keeps to it; LBFGS may not


PICTURE = "picture"  # the report stage of `fusion.check`'s prediction errors
_NAMES = {"fused": "fused", "average": "averaged", "stacked": "stacked"}


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


@dataclass
class LayerMeasure:
    """One fused layer measured against its statistics (see `measure_layers`)."""

    name: str
    recorded: list[list[float]]  # [fused, averaged, stacked] x concepts
    unseen: list[list[float]] | None  # the same on held-out inputs (None: none recorded)
    moved: float  # ||W - W0||_F
    delta_norms: list[float]  # ||dW_i||_F per concept
    rows: list[int]
    held_rows: list[int]
    width: int
    info: dict = field(default_factory=dict)


def measure_layers(stats: dict[str, LayerStats], held: dict[str, LayerStats], fused: dict[str, torch.Tensor],
                   infos: dict[str, dict]) -> list[LayerMeasure]:
    """Relative output errors of the fused weights and of the two baselines users have without
    fusion, weight averaging (W0 + mean dW_i) and LoRA stacking (W0 + sum dW_i: every LoRA at weight
    1 at once), on the recorded and the held-out inputs of each layer."""
    out = []
    for name, st in stats.items():
        w = fused[name]
        candidates = [w, weight_average(st), weight_stack(st)]
        out.append(LayerMeasure(
            name=name, recorded=relative_errors_many(candidates, st),
            unseen=relative_errors_many(candidates, held[name]) if name in held else None,
            moved=float(torch.linalg.vector_norm(w.to(torch.float64) - st.w0.to(torch.float64))),
            delta_norms=list(st.delta_norms), rows=list(st.rows),
            held_rows=list(held[name].rows) if name in held else [0] * len(st.rows), width=st.in_features,
            info=infos.get(name, {})))
    return out


_ERRORS = ("fused", "average", "stacked", "held_out", "held_out_average", "held_out_stacked")


def stage_report(stage: str, concepts: Sequence[str], layers: Sequence[LayerMeasure], warnings: list[str]) -> list[dict]:
    """One row per concept: relative output errors (recorded and held-out inputs; fused, averaged,
    stacked; mean over the stage's layers where the concept changes something), the fused change
    ||W - W0||_F relative to the concept's own ||dW_i||_F (worst layer), the rows recorded in the
    layer they cover least, and the solve's choices (median ridge, layers the trust region capped).
    Out-of-bounds values add a line to `warnings` and a flag to the row."""
    if not layers:
        return []
    n = len(concepts)
    err: list[dict[str, list[float]]] = [{k: [] for k in _ERRORS} for _ in range(n)]
    distance = [(0.0, "")] * n
    change = (0.0, "")  # worst ||W - W0|| / sum_j ||dW_j|| over the stage's layers
    coverage = [(float("inf"), 0, 0, 0)] * n  # (rows / width, rows, held-out rows, width) of the thinnest layer
    held = all(m.unseen is not None for m in layers)
    for m in layers:
        total = sum(m.delta_norms)
        if total > 0 and m.moved / total > change[0]:
            change = (m.moved / total, m.name)
        for i in range(n):
            ratio = m.rows[i] / m.width
            if ratio < coverage[i][0]:
                coverage[i] = (ratio, m.rows[i], m.held_rows[i], m.width)
            if m.delta_norms[i] == 0:
                continue  # no change of this concept here: its relative error is undefined
            for k, key in enumerate(("fused", "average", "stacked")):
                err[i][key].append(m.recorded[k][i])
                if m.unseen is not None:
                    err[i]["held_out" + ("" if k == 0 else "_" + key)].append(m.unseen[k][i])
            if m.moved / m.delta_norms[i] > distance[i][0]:
                distance[i] = (m.moved / m.delta_norms[i], m.name)
    ridges = [m.info["ridge"] for m in layers if "ridge" in m.info]
    capped = sum(bool(m.info.get("capped")) for m in layers)
    if change[0] > DISTANCE_BOUND:
        warnings.append(f"{stage}: the fused change is {change[0]:.1f}x all concepts' changes together in "
                        f"{change[1]} (bound {DISTANCE_BOUND}x): weights far from the base and the concepts")
    rows = []
    for i, concept in enumerate(concepts):
        row = {"concept": concept, "stage": stage, "layers": len(layers),
               **{k: _mean(v) for k, v in err[i].items()},
               "distance": distance[i][0], "distance_layer": distance[i][1], "change": change[0],
               "rows": coverage[i][1], "held_out_rows": coverage[i][2], "width": coverage[i][3],
               "ridge": statistics.median(ridges) if ridges else None, "capped": capped, "flags": []}
        if not held:
            row["held_out"] = row["held_out_average"] = row["held_out_stacked"] = None
        elif row["held_out"] > max(HELD_OUT_BOUND, HELD_OUT_MARGIN * row["held_out_average"]):
            row["flags"].append("held-out")
            warnings.append(f"{concept} / {stage}: held-out error {row['held_out']:.2f} (bound "
                            f"{HELD_OUT_BOUND}: worse than leaving the concept out; averaging gives "
                            f"{row['held_out_average']:.2f})")
        if change[0] > DISTANCE_BOUND:
            row["flags"].append("distance")
        rows.append(row)
    return rows


def concept_summary(report: Sequence[dict]) -> list[str]:
    """One line per concept. With a "picture" row (`fusion.check`), the verdict is what the merged
    model draws: the CFG-guided prediction's error against the concept's own model, fused vs
    averaged vs stacked, and where fusion is not the best, what to use instead. Without one (older
    reports), its mean layer error over the stages, on held-out inputs where they were recorded."""
    lines = []
    for concept in dict.fromkeys(r["concept"] for r in report):
        picture = [r for r in report if r["concept"] == concept and r["stage"] == PICTURE]
        rows = [r for r in report if r["concept"] == concept and r["stage"] != PICTURE]
        if picture:
            errors = {m: picture[0][m] for m in check.METHODS}
            best = check.best_method(errors)
            line = (f"{concept}: what it draws, error against its own model (0 = as its own, 1 = as without "
                    f"it): fused {errors['fused']:.3f}, averaged {errors['average']:.3f}, stacked "
                    f"{errors['stacked']:.3f} (best: {_NAMES[best]})")
            if best != "fused":
                line += (f"; {_NAMES[best]} keeps it better than fusion here: give each concept its own region "
                         f"with its LoRA (Mix-of-Show regions, nothing merged, region LoRAs in separate passes), "
                         f"or merge it {_NAMES[best]}")
            lines.append(line)
            continue
        unseen = all(isinstance(r.get("held_out"), (int, float)) for r in rows)
        keys = ("held_out", "held_out_average", "held_out_stacked") if unseen else ("fused", "average", "stacked")
        if not rows or not all(isinstance(r.get(k), (int, float)) for r in rows for k in keys):
            continue  # a report written before stacking was measured
        fused, avg, stack = (_mean([r[k] for r in rows]) for k in keys)
        best = "fused" if fused <= min(avg, stack) else ("averaged" if avg <= stack else "stacked")
        lines.append(f"{concept}: {'held-out' if unseen else 'recorded'} error over {len(rows)} stage(s): fused "
                     f"{fused:.3f}, averaged {avg:.3f}, stacked {stack:.3f} (best: {best})")
    return lines


def verdicts(report: Sequence[dict]) -> dict[str, str]:
    """concept -> the method the report finds best ("fused", "average", "stacked"), from its
    picture row."""
    return {r["concept"]: check.best_method(r) for r in report if r["stage"] == PICTURE}


def format_report(report: Sequence[dict], warnings: Sequence[str] = ()) -> str:
    """The report as a text table, one summary line per concept, then the warnings. Errors are
    relative output errors (0 = the concept's change kept, 1 = as if its LoRA were dropped) on the
    recorded inputs and on held-out ones, fused vs weight averaging vs LoRA stacking; distance = ||W - W0|| / ||dW_i|| in the worst layer; rows =
    rows recorded per concept in the layer they cover least, against its input width. A note names
    stages where the trust region acted. Rows of reports written before a column existed show "-"
    there."""
    def num(value) -> str:
        return f"{value:>9.4f}" if isinstance(value, (int, float)) else f"{'-':>9}"

    lines = [f"{'concept':<16} {'stage':<7} {'layers':>6} {'fused':>9} {'averaged':>9} {'stacked':>9} "
             f"{'held-out':>9} {'averaged':>9} {'stacked':>9} {'distance':>9} {'rows/width':>12}  flags"]
    for r in report:
        distance = f"{r['distance']:.2f}x" if isinstance(r.get("distance"), (int, float)) else "-"
        rows = f"{r['rows']}/{r['width']}" if r.get("width") else "-"
        flags = ("! " + ", ".join(r["flags"])) if r.get("flags") else ""
        lines.append(f"{r['concept'][:16]:<16} {r['stage']:<7} {r['layers']:>6} {num(r['fused'])} {num(r['average'])} "
                     f"{num(r.get('stacked'))} {num(r.get('held_out'))} {num(r.get('held_out_average'))} "
                     f"{num(r.get('held_out_stacked'))} {distance:>9} {rows:>12}  {flags}".rstrip())
    lines += concept_summary(report)
    capped = {r["stage"]: (r["capped"], r["layers"]) for r in report if r.get("capped")}
    lines += [f"note: {stage}: the trust region capped {n} of {layers} layers (fused change held at "
              f"{DISTANCE_BOUND}x the concepts' changes)" for stage, (n, layers) in capped.items()]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)
