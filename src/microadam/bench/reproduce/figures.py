"""The seven figures as PNGs (matplotlib; callers check :func:`microadam.bench.plots.available`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from microadam.bench.classic import BC
from microadam.bench.plots import DPI, contour, pyplot
from microadam.bench.reproduce.experiments import (
    FIGURES,
    PANELS,
    ROSENBROCK_LR,
    WINDOW,
    Panel,
    step_ratio,
    steps_per_epoch,
)
from microadam.bench.reproduce.runs import Runs
from microadam.bench.reproduce.stats import curve_stats

__all__ = ["FILES", "plot_memory", "plot_panels", "plot_rosenbrock"]

FILES = {
    1: "fig1_density_no_ef.png",
    2: "fig2_error_feedback.png",
    3: "fig3_sparser_densities.png",
    4: "fig4_adam_vs_microadam.png",
    5: "fig5_unnormalized_and_bits.png",
    6: "fig6_rosenbrock.png",
    7: "fig7_state_bytes.png",
}
PLOT_FLOOR = 1e-10  # losses below (float32 cross-entropy reaches exact 0) drawn here


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_panels(fig_no: int, runs: Runs, out: Path) -> Path:
    """Figures 1 to 5: each panel's training loss and held-out accuracy, median over seeds;
    figure 4 with its panels side by side and the step ratio of :func:`step_ratio` beside."""
    plt = pyplot()
    panels = PANELS[fig_no]
    extra_axis = fig_no == 4
    cols = 2 if not extra_axis else len(panels) + 1
    rows = len(panels) if not extra_axis else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False)
    cycle = plt.get_cmap("tab10").colors
    for i, panel in enumerate(panels):
        ax_loss = axes[0][i] if extra_axis else axes[i][0]
        ax_acc = None if extra_axis else axes[i][1]
        _draw_panel(panel, runs, ax_loss, ax_acc, cycle)
    seeds = len(runs.seeds)
    fig.suptitle(
        f"Figure {fig_no}. {FIGURES[fig_no]} (batch 16, lr 1e-3, {runs.epochs} epochs; "
        f"median over {seeds} seed{'s' if seeds > 1 else ''}"
        + (", band: min-max)" if seeds > 1 else ")"),
        fontsize=10,
    )
    if extra_axis:
        _theory_axis(axes[0][-1], runs.epochs)
    return _save(fig, plt, out / FILES[fig_no])


def _draw_panel(panel: Panel, runs: Runs, ax_loss: Any, ax_acc: Any, cycle: Any) -> None:
    for j, v in enumerate(panel.variants):
        rs = runs.get(panel.setup, v)
        color = "black" if v.optimizer == "adam" else cycle[j % len(cycle)]
        style = ("--" if v.lr == 1e-3 else ":") if v.optimizer == "adam" else "-"
        med, lo, hi = (
            [max(x, PLOT_FLOOR) if math.isfinite(x) else math.nan for x in c]
            for c in curve_stats(rs, "train_loss")
        )
        xs = list(range(len(med)))
        ax_loss.plot(xs, med, style, color=color, lw=1.2, label=v.label)
        if len(rs) > 1:
            ax_loss.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        if ax_acc is not None:
            acc = [100 * a for a in curve_stats(rs, "val_accuracy")[0]]
            ax_acc.plot(range(len(acc)), acc, style, color=color, lw=1.0, label=v.label)
    ax_loss.set_yscale("log")
    ax_loss.set_title(panel.title, fontsize=10)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (whole train split)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    if ax_acc is not None:
        ax_acc.set_title(f"{panel.title}: held-out accuracy", fontsize=10)
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("accuracy %")
        ax_acc.grid(alpha=0.3)
        lo_acc = min(ax_acc.get_ylim()[0], 80)
        ax_acc.set_ylim(max(lo_acc, 50), 100.5)


def _theory_axis(ax: Any, epochs: int) -> None:
    horizon = epochs * steps_per_epoch(BC)
    ts = sorted({round(10 ** (k / 40)) for k in range(0, 1 + int(40 * math.log10(horizon)))})
    for betas, style in (((0.9, 0.999), "-"), ((0.9, 0.99), "--")):
        ax.plot(ts, [step_ratio(t, betas) for t in ts], style, color="black",
                label=f"betas {betas}")  # fmt: skip
    ax.axvline(horizon, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("MicroAdam step / Adam step")
    ax.set_title(f"why: window of {WINDOW}, bias correction with full t", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_rosenbrock(res: dict[str, dict[str, Any]], out: Path, steps: int) -> Path:
    """Figure 6: the paths on the contours of Rosenbrock's function, and its value."""
    from microadam.bench.functions import ROSENBROCK_START, rosenbrock

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    contour(ax, rosenbrock, (-1.6, 1.6), (-0.6, 1.6))
    colors = ["black", "tab:red", "tab:blue", "tab:green"]
    for (name, r), c in zip(res.items(), colors, strict=True):
        xs, ys = zip(*r["path"], strict=True)
        # Adam dashed and on top: the Top-K paths run along it for much of the valley.
        style = {"ls": "--", "zorder": 5} if c == "black" else {}
        ax.plot(xs, ys, color=c, lw=1.1, label=name, **style)
        ax2.plot([max(v, 1e-16) for v in r["values"]], color=c, lw=1.1, label=name, **style)
    ax.plot(*ROSENBROCK_START, "ko", ms=6)
    ax.plot(1.0, 1.0, "k*", ms=13)
    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"trajectories from {ROSENBROCK_START}, lr {ROSENBROCK_LR}, {steps} steps")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("f(x, y)")
    ax2.grid(alpha=0.3)
    ax2.set_title("function value")
    fig.suptitle(f"Figure 6. {FIGURES[6]}", fontsize=10)
    return _save(fig, plt, out / FILES[6])


def plot_memory(table: Any, out: Path) -> Path:
    """Figure 7: bars of state bytes per parameter, one per optimizer and model size."""
    plt = pyplot()
    names = [n for n, row in table.values.items() if any(v is not None for v in row.values())]
    names.sort(key=lambda n: table.values[n][next(iter(table.sizes))] or 0.0)
    sizes = list(table.sizes)
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, size in enumerate(sizes):
        vals = [table.values[n][size] or 0.0 for n in names]
        xs = [k + (i - (len(sizes) - 1) / 2) * width for k in range(len(names))]
        ax.bar(xs, vals, width, label=f"{size} ({table.sizes[size] / 1e6:.2f}M parameters)")
    for k, n in enumerate(names):
        v = table.values[n][sizes[-1]]
        ax.annotate(f"{v:.2f}", (k + (len(sizes) - 1) / 2 * width, v), ha="center",
                    va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=25, ha="right")
    ax.set_ylabel("optimizer-state bytes per parameter")
    ax.axhline(8.0, color="grey", lw=0.6, ls="--")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Figure 7. {FIGURES[7]} (after one step; float32 parameters)", fontsize=10)
    return _save(fig, plt, out / FILES[7])
