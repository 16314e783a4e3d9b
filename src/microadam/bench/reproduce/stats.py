"""The numbers of each variant over its seeds (curves, medians, the worst seed's rise), and
the table of them that each panel of figures 1 to 5 shows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from microadam.bench.report import fmt, markdown_table
from microadam.bench.reproduce.experiments import Panel
from microadam.bench.reproduce.runs import Runs

__all__ = ["TARGET", "checkpoints", "curve_stats", "facts_table", "num", "summary"]

TARGET = 1e-3  # "epochs to reach" this training loss


def num(x: Any) -> float:
    """A saved number (None stood for a non-finite one)."""
    return math.inf if x is None else float(x)


def _median(xs: Sequence[Any]) -> float | None:
    vals = [x for x in xs if isinstance(x, int | float) and math.isfinite(x)]
    return statistics.median(vals) if vals else None


def curve_stats(runs: list[dict[str, Any]], key: str) -> tuple[list, list, list]:
    """Median, min and max over the runs of the curve ``key``, epoch by epoch."""
    n = max(len(r[key]) for r in runs)
    med, lo, hi = [], [], []
    for i in range(n):
        xs = [num(r[key][i]) for r in runs if i < len(r[key])]
        xs = [x for x in xs if math.isfinite(x)]
        med.append(statistics.median(xs) if xs else math.nan)
        lo.append(min(xs) if xs else math.nan)
        hi.append(max(xs) if xs else math.nan)
    return med, lo, hi


def _epochs_to(losses: list[Any], target: float = TARGET) -> int | None:
    return next((e for e, v in enumerate(losses) if num(v) < target), None)


def checkpoints(epochs: int) -> list[int]:
    """The epochs whose loss the tables show: a tenth, half and all of the run."""
    return sorted({max(1, epochs // 10), epochs // 2, epochs} - {0})


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's numbers over seeds: medians, and the worst seed for instability."""
    epochs = len(runs[0]["train_loss"]) - 1
    tail = max(1, epochs // 10)
    late = [num(v) for r in runs for v in r["train_loss"][-tail:]]
    worst = max(runs, key=lambda r: r["rise"] or 0.0)
    reach = [_epochs_to(r["train_loss"]) for r in runs]
    return {
        "final": _median([r["final_train"] for r in runs]),
        "best": _median([r["best_train"] for r in runs]),
        "at": {e: _median([num(r["train_loss"][e]) for r in runs]) for e in checkpoints(epochs)},
        "reach": None if None in reach else statistics.median(reach),
        "reached": sum(x is not None for x in reach),
        "late": (min(late), max(late)),
        "spikes": [r["spikes"] for r in runs],
        "last_spike": max((r["last_spike"] or 0) for r in runs) or None,
        "rise": worst["rise"] or 0.0,
        "rise_from": worst["rise_from"],
        "rise_epoch": worst["rise_epoch"],
        "acc": _median([r["final_val_accuracy"] for r in runs]),
        "diverged": sum(r["status"] != "ok" for r in runs),
        "messages": [r["message"] for r in runs if r["message"]],
        "kept": runs[0]["kept_per_tensor"],
        "num_params": runs[0]["num_params"],
        "eff": runs[0]["effective_density"],
        "state": runs[0]["state_bytes_per_param"],
        "seeds": len(runs),
    }


def _rise_text(s: dict[str, Any]) -> str:
    if not s["rise_epoch"]:
        return "-"
    return f"+{fmt(s['rise'])} from {fmt(s['rise_from'])} (epoch {s['rise_epoch']})"


def facts_table(panel: Panel, runs: Runs) -> tuple[str, dict[str, dict[str, Any]]]:
    """The panel's markdown table, and the :func:`summary` of each variant by label (what
    training them all, on first use, measured)."""
    stats = {v.label: summary(runs.get(panel.setup, v)) for v in panel.variants}
    cps = checkpoints(runs.epochs)
    header = [
        "optimizer", "kept per step", *[f"loss @{c}" for c in cps[:-1]], "final loss",
        f"epochs to {TARGET:g}", "last 10% of epochs: min - max", "spike epochs per seed",
        "largest rise", "held-out acc %", "state B/param",
    ]  # fmt: skip
    rows = []
    for v in panel.variants:
        s = stats[v.label]
        if v.optimizer == "adam":
            kept = "all"
        else:
            kept = f"{sum(s['kept'])} of {s['num_params']} ({100 * s['eff']:.2f}%)"
        final = fmt(s["final"]) if s["diverged"] == 0 else f"{s['diverged']} diverged"
        reach = (
            f"{s['reach']:g}" if s["reach"] is not None else f"{s['reached']}/{s['seeds']} seeds"
        )
        rows.append([
            v.label, kept, *[fmt(s["at"].get(c)) for c in cps[:-1]], final, reach,
            f"{fmt(s['late'][0])} - {fmt(s['late'][1])}", ", ".join(map(str, s["spikes"])),
            _rise_text(s), fmt(100 * s["acc"] if s["acc"] is not None else None, 4),
            f"{s['state']:.2f}",
        ])  # fmt: skip
    return markdown_table(header, rows), stats
