"""PNG figures from a results document (matplotlib, Agg backend; optional).

If matplotlib is missing, :func:`plot_all` returns no figures and :data:`MISSING` says how to
install it; results and reports are written all the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microadam.bench.results import best_runs, finite, summarize

__all__ = [
    "DPI",
    "MISSING",
    "available",
    "plot_all",
    "plot_curves",
    "plot_gap_vs_state",
    "plot_lr_grid",
    "plot_state_bytes",
    "plot_trajectories",
    "pyplot",
    "smooth",
]

DPI = 100
MISSING = (
    "matplotlib is not installed, so no PNG figures were drawn (results and report.md are "
    "written all the same): pip install 'microadam[plot]'"
)


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def colors(names: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per optimizer, in the order given."""
    plt = pyplot()
    cycle = plt.get_cmap("tab10").colors
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


def smooth(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average over ``width`` points (non-finite points are skipped)."""
    if width <= 1:
        return list(values)
    out, window, total = [], [], 0.0
    for v in values:
        if not finite(v):
            out.append(math.nan)
            continue
        window.append(v)
        total += v
        if len(window) > width:
            total -= window.pop(0)
        out.append(total / len(window))
    return out


def _ragged_stats(series: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Median, min and max at each index over the series that reach it."""
    import statistics

    n = max((len(s) for s in series), default=0)
    med, lo, hi = [], [], []
    for i in range(n):
        xs = [s[i] for s in series if i < len(s) and finite(s[i])]
        med.append(statistics.median(xs) if xs else math.nan)
        lo.append(min(xs) if xs else math.nan)
        hi.append(max(xs) if xs else math.nan)
    return med, lo, hi


def _plotted(results: dict[str, Any]) -> list[str]:
    return [o["name"] for o in results["optimizers"] if best_runs(results, o["name"])]


def plot_curves(results: dict[str, Any], out_dir: str | Path, x: str = "step") -> Path:
    """Training loss (smoothed) and validation metric against steps or wall time.

    Lines are the median over seeds at each optimizer's chosen lr; shaded bands span the
    seeds. ``x`` is ``"step"`` or ``"time"``.
    """
    plt = pyplot()
    w = results["workload"]
    names = _plotted(results)
    col = colors([o["name"] for o in results["optimizers"]])
    steps = results["settings"]["steps"]
    width = 1 if w["kind"] == "function" else max(1, steps // 40)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        runs = best_runs(results, name)
        lr = runs[0]["lr"]
        train = [smooth(r["curve"]["train_loss"], width) for r in runs]
        med, lo, hi = _ragged_stats(train)
        if x == "step":
            xs = list(range(1, len(med) + 1))
        else:
            xs = _ragged_stats([r["curve"]["wall_s"] for r in runs])[0]
        label = f"{name} (lr {lr:g})"
        ax1.plot(xs, med, color=col[name], label=label, lw=1.4)
        if len(runs) > 1:
            ax1.fill_between(xs, lo, hi, color=col[name], alpha=0.18, lw=0)
        ev_x = "step" if x == "step" else "wall_s"
        vmed, vlo, vhi = _ragged_stats([r["evals"]["val"] for r in runs])
        exs = _ragged_stats([r["evals"][ev_x] for r in runs])[0]
        ax2.plot(exs, vmed, color=col[name], label=label, lw=1.4, marker="o", ms=3)
        if len(runs) > 1:
            ax2.fill_between(exs, vlo, vhi, color=col[name], alpha=0.18, lw=0)
    xlabel = "step" if x == "step" else "training wall time (s, evaluation excluded)"
    smooth_note = f", moving average of {width} steps" if width > 1 else ""
    ax1.set_title(f"training loss ({'batch' if w['kind'] != 'function' else 'f(x)'}{smooth_note})")
    ax2.set_title(f"validation {w['metric_label']}")
    for ax in (ax1, ax2):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(w["metric_label"])
        if w.get("log_scale"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if names:
        ax2.legend(fontsize=8)
    seeds = len(results["settings"]["seeds"])
    fig.suptitle(
        f"{w['name']}: {w['num_params']:,} parameters, median over {seeds} seed(s), "
        "best lr per optimizer"
    )
    fig.tight_layout()
    path = Path(out_dir) / ("loss_vs_steps.png" if x == "step" else "loss_vs_time.png")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_state_bytes(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Bar chart: optimizer-state bytes per parameter, by optimizer."""
    plt = pyplot()
    col = colors([o["name"] for o in results["optimizers"]])
    names, values = [], []
    for o in results["optimizers"]:
        runs = [r for r in results["runs"] if r["optimizer"] == o["name"]]
        if runs:
            names.append(o["name"])
            values.append(runs[0]["state_bytes_per_param"])
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 3.8))
    bars = ax.bar(names, values, color=[col[n] for n in names])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("optimizer-state bytes per parameter")
    w = results["workload"]
    ax.set_title(f"{w['name']} ({w['num_params']:,} parameters): state bytes per parameter")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path = Path(out_dir) / "state_bytes.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_lr_grid(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """Median final validation metric against lr, one line per optimizer (the selection)."""
    entries = [o for o in results["optimizers"] if o["status"] != "skipped" and o["lrs"]]
    if not entries or all(len(o["lrs"]) < 2 for o in entries):
        return None
    plt = pyplot()
    col = colors([o["name"] for o in results["optimizers"]])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for o in entries:
        ys = [s if s is not None else math.nan for s in o["scores"]]
        ax.plot(o["lrs"], ys, marker="o", color=col[o["name"]], label=o["name"])
        if o["best_lr"] is not None:
            ax.plot([o["best_lr"]], [ys[o["lrs"].index(o["best_lr"])]], marker="*", ms=14,
                    color=col[o["name"]])  # fmt: skip
    w = results["workload"]
    ax.set_xscale("log")
    if w.get("log_scale"):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"median final validation {w['metric_label']}")
    ax.set_title(f"{w['name']}: learning-rate grid (star: chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "lr_grid.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def contour(ax, fn, xlim: tuple[float, float], ylim: tuple[float, float], n: int = 300) -> None:
    """Contours of a 2-D function ``fn`` (torch, coordinates first) on ``ax``.

    Levels are quantiles of the function over the window, so that the picture shows as
    much of a narrow valley (Rosenbrock) as of a wide bowl (the quadratic).
    """
    import numpy as np
    import torch

    xs = torch.linspace(*xlim, n, dtype=torch.float64)
    ys = torch.linspace(*ylim, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = fn(torch.stack([gx, gy])).numpy()
    levels = np.unique(np.quantile(z, np.linspace(0.0, 1.0, 22) ** 1.5)[1:-1])
    if len(levels) < 2:
        return
    ax.contourf(gx.numpy(), gy.numpy(), z, levels=levels, cmap="Blues_r", alpha=0.25,
                extend="both")  # fmt: skip
    ax.contour(gx.numpy(), gy.numpy(), z, levels=levels, colors="grey", linewidths=0.5,
               alpha=0.7)  # fmt: skip


def trajectory_limits(
    paths: Sequence[Sequence[Sequence[float]]], base: tuple[float, float, float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits covering ``base`` (x0, x1, y0, y1) and the paths, capped at 3x its span."""
    x0, x1, y0, y1 = base
    pts = [p for path in paths for p in path if all(finite(v) for v in p)]
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        sx, sy = x1 - x0, y1 - y0
        x0, x1 = max(min(x0, min(xs)), x0 - sx), min(max(x1, max(xs)), x1 + sx)
        y0, y1 = max(min(y0, min(ys)), y0 - sy), min(max(y1, max(ys)), y1 + sy)
    mx, my = 0.05 * (x1 - x0), 0.05 * (y1 - y0)
    return (x0 - mx, x1 + mx), (y0 - my, y1 + my)


def plot_trajectories(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """Seed 0's path of every optimizer (at its chosen lr) on the function's contours."""
    from microadam.bench.workloads import FunctionWorkload

    w = results["workload"]
    if w["kind"] != "function" or w["config"].get("dim") != 2:
        return None
    fw = FunctionWorkload(
        w["name"],
        dim=2,
        **({"condition": w["config"]["condition"]} if "condition" in w["config"] else {}),
    )
    plt = pyplot()
    col = colors([o["name"] for o in results["optimizers"]])
    paths = {}
    for o in results["optimizers"]:
        runs = best_runs(results, o["name"]) or [
            r for r in results["runs"] if r["optimizer"] == o["name"]
        ]
        runs = sorted(runs, key=lambda r: r["seed"])
        if runs and runs[0]["trajectory"]:
            paths[o["name"]] = (runs[0]["lr"], runs[0]["trajectory"])
    start, opt = w["config"]["start"], w["config"]["optimum"]
    base = (-2.0, 2.0, -1.0, 3.0) if w["name"] == "rosenbrock" else (-1.6, 1.6, -1.6, 1.6)
    xlim, ylim = trajectory_limits([p for _, p in paths.values()], base)
    fig, ax = plt.subplots(figsize=(7, 6))
    contour(ax, fw.fn, xlim, ylim)
    for name, (lr, path) in paths.items():
        pts = [p for p in path if all(finite(v) for v in p)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=col[name], lw=1.3,
                marker=".", ms=2, label=f"{name} (lr {lr:g})")  # fmt: skip
    ax.plot([start[0]], [start[1]], "ko", ms=6, label="start")
    ax.plot([opt[0]], [opt[1]], "k*", ms=12, label="minimum")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    title = (
        "Rosenbrock"
        if w["name"] == "rosenbrock"
        else (f"quadratic, condition number {w['config']['condition']:g}")
    )
    ax.set_title(f"{title}: {results['settings']['steps']} steps, seed 0, best lr")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(out_dir) / "trajectories.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_gap_vs_state(results: dict[str, Any], out_dir: str | Path) -> Path | None:
    """Fine-tuning: each optimizer's gap to AdamW in the final validation metric against
    its optimizer-state bytes per parameter (where AdamW ran and the runs report
    forgetting); the lower left is better."""
    summary = results.get("summary") or summarize(results)
    ref = next((s for s in summary if s["optimizer"] == "adamw" and s["status"] == "ok"), None)
    if ref is None or ref["val"]["median"] is None:
        return None
    if not any((s.get("pretrain_val") or {}).get("n") for s in summary):
        return None
    points = [
        (s["optimizer"], s["state_bytes_per_param"], s["val"]["median"] - ref["val"]["median"])
        for s in summary
        if s["status"] == "ok" and s["val"]["median"] is not None and s["state_bytes_per_param"]
    ]
    plt = pyplot()
    col = colors([name for name, _, _ in points])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, x, y in points:
        ax.scatter([x], [y], color=col[name], s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.xaxis.set_major_locator(FixedLocator([0.03, 0.1, 0.3, 1, 3, 10, 30]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer-state bytes per parameter (log scale)")
    w = results["workload"]
    ax.set_ylabel(f"final val {w['metric']} minus AdamW's")
    ax.set_title(f"{w['name']}: gap to AdamW against optimizer memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / "gap_vs_state_bytes.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_all(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Every figure of a bench results document; ``[]`` without matplotlib."""
    if not available():
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: list[Path | None] = [
        plot_curves(results, out_dir, "step"),
        plot_curves(results, out_dir, "time"),
        plot_state_bytes(results, out_dir),
        plot_lr_grid(results, out_dir),
        plot_trajectories(results, out_dir),
        plot_gap_vs_state(results, out_dir),
    ]
    return [f for f in figs if f is not None]
