"""The bench's results file: one JSON document per ``microadam bench`` run.

``microadam bench WORKLOAD --out DIR`` writes ``DIR/results.json``; ``microadam plot
DIR/results.json`` redraws every figure, the table and ``report.md`` from it without
training again. The schema (``"schema": "microadam.bench/1"``)::

    {
      "schema": "microadam.bench/1",
      "command": "microadam bench lm --quick",     # argv that produced the file
      "created": "2025-01-01T12:00:00+00:00",      # UTC, ISO 8601
      "environment": {"python", "torch", "platform", "machine", "threads", "device"},
      "workload": {
        "name": "lm",                              # rosenbrock | quadratic | iris |
                                                   # breast-cancer | digits | lm
        "kind": "lm",                              # function | tabular | lm
        "metric": "bpb",                           # what "train"/"val" measure
        "metric_label": "bits per byte",
        "validation": "...",                       # what the validation split is
        "num_params": 3356160,
        "config": {...}                            # every setting of the workload
      },
      "settings": {
        "steps": 300, "seeds": [0], "eval_every": 30, "device": "cpu",
        "lr_factors": [0.333, 1.0, 3.0],           # or null when --lrs gave explicit values
        "lrs": null,                               # explicit grid, same for every optimizer
        "selection": "..."                         # how the best lr was chosen, in words
      },
      "optimizers": [                              # one per requested optimizer, in order
        {"name": "adamw",                          # a registry name, or a variant's label
                                                   # such as "microadam[density=0.1]"
         "registry_name": "adamw",
         "status": "ok",                           # ok | skipped | failed
         "reason": null,                           # why skipped/failed
         "needs_closure": false,
         "lrs": [0.001, 0.003, 0.01],
         "best_lr": 0.003,                         # null when no lr gave a finite result
         "scores": [1.93, 1.87, 2.10]}             # median final val per lr (null: diverged)
      ],
      "runs": [                                    # one per optimizer x lr x seed
        {"optimizer": "adamw", "lr": 0.003, "seed": 0,     # optimizer: the entry's name
         "status": "ok",                           # ok | diverged | failed
         "message": null,                          # what happened, for diverged/failed
         "hyperparameters": {...},                 # exactly what the optimizer was given
         "steps_done": 300,
         "curve": {                                # one entry per step (1 .. steps_done)
           "step": [...],
           "wall_s": [...],                        # training time so far (no evaluation)
           "train_loss": [...]},                   # loss of the step's batch, before the
                                                   # update (full batch for closures), in
                                                   # the workload's metric
         "evals": {                                # at step 0, every eval_every, and the end
           "step": [...], "wall_s": [...],
           "train": [...], "val": [...],           # whole-split metrics
           "train_accuracy": [...] | null, "val_accuracy": [...] | null},
         "final": {"train", "val", "train_accuracy", "val_accuracy"},  # null if diverged
         # fine-tuning workloads also report "pretrain_val", in "evals" and "final"
         "num_params": 3356160,
         "state_bytes": 3075268,                   # microadam.memory.state_bytes at the end
         "state_bytes_per_param": 0.916,
         "peak_rss_mb": 812.4,                     # process RSS, max over step boundaries
         "peak_device_mb": null,                   # torch.cuda.max_memory_allocated
         "median_step_ms": 41.2,                   # optimizer.step() (with its closure calls)
         "median_iter_ms": 230.5,                  # batch + forward + backward + step
         "closure_calls": null,                    # total closure evaluations (closures only)
         "wall_s": 69.1,                           # training time of the whole run
         "trajectory": [[x, y], ...] | null}       # 2-D function workloads: start + each step
      ],
      "summary": [...]                             # derived: see summarize(); recomputed on load
    }

Non-finite numbers are written as ``null``. ``summary`` holds, per optimizer at its best lr,
the median, min and max over seeds of the final train and validation metric and accuracy,
and the medians of state bytes per parameter, peak RSS and step time.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA",
    "best_runs",
    "finite",
    "load_results",
    "save_results",
    "summarize",
    "validate_results",
]

SCHEMA = "microadam.bench/1"

_TOP_KEYS = ("schema", "command", "created", "environment", "workload", "settings")
_RUN_KEYS = (
    "optimizer", "lr", "seed", "status", "message", "hyperparameters", "steps_done", "curve",
    "evals", "final", "num_params", "state_bytes", "state_bytes_per_param", "peak_rss_mb",
    "peak_device_mb", "median_step_ms", "median_iter_ms", "closure_calls", "wall_s",
    "trajectory",
)  # fmt: skip


def finite(x: Any) -> bool:
    """Whether ``x`` is a real, finite number (``None`` and NaN are not)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become ``None``, tuples lists, dtypes strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def validate_results(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing or wrong field of a results document."""
    if results.get("schema") != SCHEMA:
        raise ValueError(f"Invalid results: schema {results.get('schema')!r} (expected {SCHEMA})")
    for key in (*_TOP_KEYS, "optimizers", "runs"):
        if key not in results:
            raise ValueError(f"Invalid results: missing key {key!r}")
    for i, run in enumerate(results["runs"]):
        for key in _RUN_KEYS:
            if key not in run:
                raise ValueError(f"Invalid results: run {i} has no key {key!r}")
        if run["status"] not in ("ok", "diverged", "failed"):
            raise ValueError(f"Invalid results: run {i} has status {run['status']!r}")
        n = len(run["curve"]["step"])
        for key in ("wall_s", "train_loss"):
            if len(run["curve"][key]) != n:
                raise ValueError(f"Invalid results: run {i} curve {key!r} has the wrong length")
    for opt in results["optimizers"]:
        if opt.get("status") not in ("ok", "skipped", "failed"):
            raise ValueError(f"Invalid results: optimizer {opt.get('name')!r} has a bad status")


# Significant digits kept for the per-step curves and evaluations: what the figures need,
# and a third of the file size of full precision (a 105-run fine-tuning bench writes 2.5 MB
# instead of 6.9). Final metrics and everything else keep full precision.
CURVE_DIGITS = 6


def _rounded(values: Any) -> Any:
    if isinstance(values, list):
        return [float(f"{v:.{CURVE_DIGITS}g}") if isinstance(v, float) else v for v in values]
    return values


def save_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``results`` (with a fresh ``summary``) as compact JSON; return the path."""
    results = dict(results)
    results["summary"] = summarize(results)
    clean = _clean(results)
    validate_results(clean)
    for run in clean["runs"]:
        for series in ("curve", "evals"):
            if isinstance(run.get(series), dict):
                run[series] = {k: _rounded(v) for k, v in run[series].items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, separators=(",", ":")) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results file (a file, or a folder holding ``results.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    results = json.loads(path.read_text())
    validate_results(results)
    results["summary"] = summarize(results)
    return results


def best_runs(results: dict[str, Any], optimizer: str) -> list[dict[str, Any]]:
    """The runs (every seed) of ``optimizer`` at its chosen learning rate."""
    entry = next((o for o in results["optimizers"] if o["name"] == optimizer), None)
    if entry is None or entry.get("best_lr") is None:
        return []
    return [
        r for r in results["runs"] if r["optimizer"] == optimizer and r["lr"] == entry["best_lr"]
    ]


def _stats(values: list[Any]) -> dict[str, Any]:
    xs = [v for v in values if finite(v)]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _median(values: list[Any]) -> float | None:
    xs = [v for v in values if finite(v)]
    return statistics.median(xs) if xs else None


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per optimizer: statistics over seeds of its runs at the chosen learning rate."""
    rows = []
    for entry in results["optimizers"]:
        runs = best_runs(results, entry["name"])
        finals = [r["final"] or {} for r in runs]
        rows.append({
            "optimizer": entry["name"],
            "status": entry["status"],
            "reason": entry.get("reason"),
            "best_lr": entry.get("best_lr"),
            "seeds": len(runs),
            "diverged": sum(r["status"] == "diverged" for r in runs),
            "failed": sum(r["status"] == "failed" for r in runs),
            "train": _stats([f.get("train") for f in finals]),
            "val": _stats([f.get("val") for f in finals]),
            "val_accuracy": _stats([f.get("val_accuracy") for f in finals]),
            "pretrain_val": _stats([f.get("pretrain_val") for f in finals]),
            "state_bytes_per_param": _median([r["state_bytes_per_param"] for r in runs]),
            "peak_rss_mb": _median([r["peak_rss_mb"] for r in runs]),
            "peak_device_mb": _median([r["peak_device_mb"] for r in runs]),
            "median_step_ms": _median([r["median_step_ms"] for r in runs]),
            "median_iter_ms": _median([r["median_iter_ms"] for r in runs]),
            "wall_s": _median([r["wall_s"] for r in runs]),
        })  # fmt: skip
    return rows
