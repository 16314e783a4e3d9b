"""Tables and ``report.md`` from a results document (no training here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microadam.bench.results import finite, summarize

__all__ = ["fmt", "markdown_table", "summary_rows", "text_table", "write_report"]

SUMMARY_HEADER = (
    "optimizer", "best lr", "final train", "final val", "val acc %", "state B/param",
    "peak RSS MB", "step ms", "runs ok",
)  # fmt: skip
# After a best lr at either end of a grid of several lrs.
EDGE_MARK = " (edge)"
EDGE_NOTE = (
    f"{EDGE_MARK.strip()}: the best lr is at an end of its grid, so the optimum may lie "
    "outside it (widen the grid: --lr-grid 5, or --lrs)."
)


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table: fixed point, or scientific below 1e-3 and above 1e5."""
    if not finite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 1e-3 or abs(x) >= 1e5:
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits - 1}f}"


def _fixed(x: Any, decimals: int) -> str:
    return f"{x:.{decimals}f}" if finite(x) else "-"


def _spread(stats: dict[str, Any], scale: float = 1.0, digits: int = 4) -> str:
    """``median [min, max]`` over seeds (just the value for one seed)."""
    if stats["median"] is None:
        return "-"
    med = fmt(stats["median"] * scale, digits)
    if stats["n"] <= 1 or stats["min"] == stats["max"]:
        return med
    return f"{med} [{fmt(stats['min'] * scale, digits)}, {fmt(stats['max'] * scale, digits)}]"


def _has_forgetting(summary: list[dict[str, Any]]) -> bool:
    return any((s.get("pretrain_val") or {}).get("n") for s in summary)


def _gap_reference(summary: list[dict[str, Any]]) -> float | None:
    """AdamW's median final validation metric, where AdamW ran (the fine-tuning baseline)."""
    ref = next((s for s in summary if s["optimizer"] == "adamw" and s["status"] == "ok"), None)
    return None if ref is None else ref["val"]["median"]


def _at_edge(entry: dict[str, Any]) -> bool:
    """Whether the entry's best lr is the lowest or highest of a grid of several lrs."""
    lrs = entry.get("lrs") or []
    return len(lrs) > 1 and entry.get("best_lr") in (min(lrs), max(lrs))


def edge_note(results: dict[str, Any]) -> str | None:
    """:data:`EDGE_NOTE` if some optimizer's best lr is at an edge of its grid, else None."""
    return EDGE_NOTE if any(_at_edge(e) for e in results["optimizers"]) else None


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per optimizer at its best lr: medians and [min, max] over seeds.

    A best lr at an edge of its grid is marked :data:`EDGE_MARK`. Fine-tuning results also
    get the metric on the pretraining data after fine-tuning (forgetting) and the gap of the
    validation metric to AdamW's."""
    summary = results.get("summary") or summarize(results)
    entries = {e["name"]: e for e in results["optimizers"]}
    forgetting = _has_forgetting(summary)
    adamw = _gap_reference(summary)
    width = len(SUMMARY_HEADER) + (2 if forgetting else 0)
    rows = []
    for s in summary:
        if s["status"] != "ok" or s["best_lr"] is None:
            why = s["reason"] or "every lr diverged"
            label = "skipped" if s["status"] == "skipped" else "no result"
            rows.append([s["optimizer"], *["-"] * (width - 2), f"{label}: {why}"])
            continue
        ok = s["seeds"] - s["diverged"] - s["failed"]
        extra = []
        if forgetting:
            val = s["val"]["median"]
            gap = val - adamw if finite(val) and finite(adamw) else None
            extra = [_spread(s["pretrain_val"]), f"{gap:+.3f}" if gap is not None else "-"]
        edge = EDGE_MARK if _at_edge(entries[s["optimizer"]]) else ""
        rows.append([
            s["optimizer"],
            f"{s['best_lr']:g}{edge}",
            _spread(s["train"]),
            _spread(s["val"]),
            *extra,
            _spread(s["val_accuracy"], 100.0, 4),
            _fixed(s["state_bytes_per_param"], 3),
            _fixed(s["peak_rss_mb"], 0),
            _fixed(s["median_step_ms"], 2),
            f"{ok}/{s['seeds']}",
        ])  # fmt: skip
    acc = 6 if forgetting else 4
    if rows and all(r[acc] == "-" for r in rows):
        for r in rows:
            del r[acc]
    return rows


def _header(results: dict[str, Any], rows: list[list[str]]) -> list[str]:
    header = list(SUMMARY_HEADER)
    metric = results["workload"]["metric"]
    if _has_forgetting(results.get("summary") or summarize(results)):
        header[4:4] = [f"pretrain val {metric}", "val - adamw"]
    if rows and len(rows[0]) == len(header) - 1:
        header.remove("val acc %")
    return [h.replace("train", f"train {metric}").replace("val", f"val {metric}", 1)
            if h in ("final train", "final val") else h for h in header]  # fmt: skip


def text_table(results: dict[str, Any]) -> str:
    """The summary as an aligned plain-text table for the terminal."""
    rows = summary_rows(results)
    header = _header(results, rows)
    widths = [max(len(h), *(len(r[i]) for r in rows if i < len(r))) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        if len(r) < len(header) or r[1] == "-":
            lines.append(f"{r[0].ljust(widths[0])}  {r[-1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    note = edge_note(results)
    return "\n".join(lines + ([f"\n{note}"] if note else []))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def lr_table(results: dict[str, Any]) -> str:
    """Median final validation metric per optimizer and lr (the selection), as markdown."""
    rows = []
    for e in results["optimizers"]:
        if e["status"] == "skipped" or not e["lrs"]:
            continue
        cells = []
        for lr, score in zip(e["lrs"], e["scores"] or [None] * len(e["lrs"]), strict=True):
            mark = " **(best)**" if lr == e["best_lr"] else ""
            cells.append(f"{lr:g}: {fmt(score) if score is not None else 'diverged'}{mark}")
        rows.append([e["name"], "; ".join(cells)])
    return markdown_table(["optimizer", "lr: median final val (over seeds)"], rows)


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    stopped = results.get("interrupted")
    if stopped:
        notes.append(
            f"- Interrupted after {stopped['runs_done']} of {stopped['runs_planned']} runs: "
            "the results are partial."
        )
    for e in results["optimizers"]:
        if e["status"] == "skipped":
            notes.append(f"- `{e['name']}` skipped: {e['reason']}.")
        elif e["status"] == "failed":
            notes.append(f"- `{e['name']}` failed: {e['reason']}")
    for r in results["runs"]:
        if r["status"] != "ok":
            notes.append(
                f"- `{r['optimizer']}` lr {r['lr']:g} seed {r['seed']} {r['status']}: "
                f"{r['message']}"
            )
    return notes


def _grid_text(settings: dict[str, Any]) -> str:
    factors = settings["lr_factors"]
    if not factors:
        return f"the learning rates {settings['lrs']}"
    times = ", ".join(f"x{f:.3g}" for f in factors)
    return f"{len(factors)} learning rate(s) ({times} the optimizer's base lr)"


def write_report(
    results: dict[str, Any], out_dir: str | Path, figures: Sequence[str | Path] = ()
) -> Path:
    """Write ``out_dir/report.md``: command, settings, tables, figures and notes."""
    out_dir = Path(out_dir)
    w, s, env = results["workload"], results["settings"], results["environment"]
    rows = summary_rows(results)
    seeds = s["seeds"]
    lines = [
        f"# `microadam bench {w['name']}`",
        "",
        "Produced by:",
        "",
        "```bash",
        results["command"] or f"microadam bench {w['name']}",
        "```",
        "",
        f"{results['created']}; Python {env['python']}, torch {env['torch']}, "
        f"{env['platform']}, {env['threads']} torch thread(s), device `{env['device']}`.",
        "",
        "## Setup",
        "",
        f"- Workload `{w['name']}` ({w['kind']}): {w['num_params']:,} parameters; metric: "
        f"{w['metric_label']}.",
        f"- Validation: {w['validation']}.",
        f"- Configuration: `{w['config']}`.",
        f"- Budget, the same for every optimizer: {s['steps']} steps x "
        f"{len(seeds)} seed(s) {seeds} x a grid of " + _grid_text(s) + ".",
        f"- Learning rate chosen on the validation split: {s['selection']}.",
        f"- Hyperparameters: {s['hyperparameters']}."
        + (f" Overrides: `{s['extra_hyperparameters']}`." if s["extra_hyperparameters"] else ""),
        "",
        "## Results at the chosen learning rate",
        "",
        "Median over seeds, [min, max] when seeds differ. State B/param: optimizer-state bytes "
        "per parameter (`microadam.state_bytes`); peak RSS: the process's resident memory, "
        "maximum over step boundaries (includes Python, torch and the data); step ms: median "
        "`optimizer.step()` time (with its closure evaluations for closure-based methods)."
        + (
            " Pretrain val: the metric on the pretraining data's validation split after "
            "fine-tuning (higher means more forgotten); val - adamw: the gap of the median "
            "final validation metric to AdamW's."
            if _has_forgetting(results.get("summary") or summarize(results))
            else ""
        ),
        "",
        markdown_table(_header(results, rows), rows),
        "",
        *([edge_note(results), ""] if edge_note(results) else []),
        "## Learning-rate grid",
        "",
        lr_table(results),
        "",
    ]
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            name = Path(fig).name
            lines += [f"![{name}]({name})", ""]
    notes = _notes(results)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    lines += [
        "The raw numbers, curves included, are in `results.json` (schema "
        f"`{results['schema']}`, documented in `microadam.bench.results`); "
        "`microadam plot results.json` redraws this report from it.",
        "",
    ]
    path = out_dir / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
