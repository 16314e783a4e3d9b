"""Run registry optimizers on a workload: learning-rate grid x seeds, measured and recorded.

Every optimizer gets the same budget: the same number of steps, the same seeds and a grid
of the same number of learning rates (centred on a per-optimizer base rate, see
:data:`BASE_LR`). The best rate is chosen on the validation split (lowest median final
validation metric over the seeds) and the results file says so. Other hyperparameters are
the library defaults except: weight decay 0 wherever the optimizer has one (so that
AdamW-style decay does not favour one method), SGD with momentum 0.9, and one iteration
(with its line search) per step for the closure-based L-BFGS, BFGS and Newton, whose
closure evaluates the whole training set. The grid and the hyperparameters are
:mod:`microadam.bench.grid`'s. Interrupted (Ctrl-C), :func:`run_bench` raises
:class:`BenchInterrupted` holding the results of the runs that finished.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from microadam.bench.grid import (
    BASE_LR,
    DEFAULT_OPTIMIZERS,
    LR_FACTORS,
    MUON_ADAMW_RATIO,
    base_hyperparameters,
    check_hyperparameters,
    default_optimizers,
    grid_hyperparameters,
    lr_grid,
    lr_values,
    parse_optimizers,
)
from microadam.bench.progress import Progress
from microadam.bench.results import SCHEMA, finite
from microadam.bench.workloads import Task, Workload
from microadam.memory import state_bytes
from microadam.optim import NonFiniteGradientError
from microadam.optim.registry import OptimizerSpec, create_optimizer, get_spec

__all__ = [
    "BASE_LR",
    "DEFAULT_OPTIMIZERS",
    "LR_FACTORS",
    "BenchInterrupted",
    "base_hyperparameters",
    "default_optimizers",
    "environment",
    "lr_values",
    "run_bench",
    "run_one",
]

WARM_UP_STEPS = 2

# What Task.evaluate reports (a workload may leave out the accuracies and pretrain_val).
EVAL_KEYS = ("train", "val", "train_accuracy", "val_accuracy", "pretrain_val")

# A finite loss this many times its starting value (plus one) ends the run as diverged.
DIVERGENCE_FACTOR = 1e6


def environment(device: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }


def _rss_bytes() -> int | None:
    """Resident set size of this process now (Linux), else its peak so far, else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


def _json_hp(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()}


def _closure(
    opt: torch.optim.Optimizer, task: Task, backward: bool, calls: list[int] | None = None
) -> Callable[[], torch.Tensor]:
    """The closure of a closure-based method: the loss on the whole training set, with
    ``backward()`` where the optimizer wants it; each call is counted in ``calls[0]``."""

    def closure() -> torch.Tensor:
        if calls is not None:
            calls[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = task.full_loss()
        if backward:
            loss.backward()
        return loss

    return closure


# -- one run --------------------------------------------------------------------------------


@dataclass
class _Run:
    """A run in progress: its task and optimizer, and what is measured while it trains."""

    spec: OptimizerSpec
    task: Task
    opt: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR | None
    trajectory: list | None
    peak_rss: int
    curve: dict[str, list] = field(
        default_factory=lambda: {"step": [], "wall_s": [], "train_loss": []}
    )
    evals: dict[str, list] = field(
        default_factory=lambda: {"step": [], "wall_s": [], **{key: [] for key in EVAL_KEYS}}
    )
    step_times: list[float] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)
    closure_calls: int = 0
    status: str = "ok"
    message: str | None = None
    wall: float = 0.0
    first_loss: float | None = None

    @property
    def backward_in_closure(self) -> bool:
        # torch.optim.LBFGS wants a closure that calls backward(); ours differentiate the loss.
        return self.spec.target.startswith("torch.")

    def record_eval(self, step: int) -> None:
        metrics = self.task.evaluate()
        self.evals["step"].append(step)
        self.evals["wall_s"].append(self.wall)
        for key in EVAL_KEYS:
            self.evals[key].append(metrics.get(key))


def _set_up(
    workload: Workload,
    optimizer: str,
    hyperparameters: dict[str, Any],
    seed: int,
    steps: int,
    device: str,
) -> _Run:
    """A fresh task of ``workload`` and its optimizer, seeded; the lr schedule if any."""
    spec = get_spec(optimizer)
    torch.manual_seed(seed)  # the model, and any randomness an optimizer draws for its state
    task = workload.make_task(seed, device)
    opt = create_optimizer(optimizer, task.model, **hyperparameters)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    schedule = None
    if task.lr_scale is not None:
        scale_of = task.lr_scale
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: scale_of(i, steps))
    trajectory = [task.point()] if task.point is not None else None
    return _Run(spec, task, opt, schedule, trajectory, peak_rss=_rss_bytes() or 0)


def _step(run: _Run, device: str) -> Any:
    """One timed optimizer step (with the full-batch closure, or on a mini-batch)."""
    if run.spec.needs_closure:
        calls = [0]
        closure = _closure(run.opt, run.task, run.backward_in_closure, calls)
        ts = time.perf_counter()
        loss = run.opt.step(closure)
        _sync(device)
        run.step_times.append(time.perf_counter() - ts)
        run.closure_calls += calls[0]
    else:
        loss = run.task.batch_loss()
        run.peak_rss = max(run.peak_rss, _rss_bytes() or 0)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        ts = time.perf_counter()
        run.opt.step()
        _sync(device)
        run.step_times.append(time.perf_counter() - ts)
    if run.schedule is not None:
        run.schedule.step()
    return loss


def _record_step(run: _Run, step: int, loss: Any) -> float:
    """Put the training loss of ``step`` (and the point reached, if any) on the curves."""
    run.peak_rss = max(run.peak_rss, _rss_bytes() or 0)
    scale = run.task.metric_scale
    value = float(loss.detach()) * scale if isinstance(loss, torch.Tensor) else float(loss)
    run.curve["step"].append(step)
    run.curve["wall_s"].append(run.wall)
    run.curve["train_loss"].append(value)
    if run.trajectory is not None:
        run.trajectory.append(run.task.point())
    return value


def _diverged(run: _Run, step: int, value: float) -> bool:
    """Whether the loss ``value`` of ``step`` ends the run as diverged (and say why)."""
    if run.first_loss is None:
        run.first_loss = value
    first = run.first_loss
    if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * (abs(first) + 1):
        run.status = "diverged"
        run.message = f"step {step}: loss {value:.3g} (started at {first:.3g})"
        return True
    return False


def _train(run: _Run, steps: int, eval_every: int, device: str, progress: Progress | None) -> int:
    """The training loop: up to ``steps`` steps, evaluated every ``eval_every``; returns
    the last step done (fewer than ``steps`` if the run diverged or failed)."""
    step = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        try:
            loss = _step(run, device)
        except RuntimeError as err:
            run.status = "diverged" if isinstance(err, NonFiniteGradientError) else "failed"
            run.message = f"step {step}: {err}"
            step -= 1
            break
        run.iter_times.append(time.perf_counter() - t0)
        run.wall += run.iter_times[-1]
        value = _record_step(run, step, loss)
        if progress is not None:
            progress.update()
        if _diverged(run, step, value):
            break
        if step % eval_every == 0 and step != steps:
            run.record_eval(step)
    if progress is not None and step < steps:
        progress.update(steps - max(step, 0))
    return step


def _final_metrics(run: _Run, step: int) -> dict[str, Any] | None:
    """The last evaluation of a run that ended well (else None); the metrics the workload
    does not report are dropped from the evaluations."""
    final = None
    if run.status == "ok":
        run.record_eval(step)
        final = {k: run.evals[k][-1] for k in EVAL_KEYS}
        if not all(finite(v) for v in final.values() if v is not None):
            run.status, run.message = "diverged", f"step {step}: non-finite final metrics"
    evals = run.evals
    has_acc = any(v is not None for v in evals["val_accuracy"])
    if not has_acc:
        evals["train_accuracy"] = evals["val_accuracy"] = None
        if final is not None:
            final["train_accuracy"] = final["val_accuracy"] = None
    if not any(v is not None for v in evals["pretrain_val"]):  # only fine-tuning has it
        del evals["pretrain_val"]
        if final is not None:
            del final["pretrain_val"]
    return final


def _run_record(
    run: _Run,
    optimizer: str,
    hyperparameters: dict[str, Any],
    seed: int,
    final: dict[str, Any] | None,
    device: str,
) -> dict[str, Any]:
    """The run's entry of the results document."""
    num_params = sum(p.numel() for p in run.task.model.parameters())
    sbytes = state_bytes(run.opt)
    cuda = device.startswith("cuda")
    step_times, iter_times = run.step_times, run.iter_times
    return {
        "optimizer": optimizer,
        "lr": hyperparameters.get("lr"),
        "seed": seed,
        "status": run.status,
        "message": run.message,
        "hyperparameters": _json_hp(hyperparameters),
        "steps_done": len(run.curve["step"]),
        "curve": run.curve,
        "evals": run.evals,
        "final": final if run.status == "ok" else None,
        "num_params": num_params,
        "state_bytes": sbytes,
        "state_bytes_per_param": sbytes / num_params,
        "peak_rss_mb": run.peak_rss / 2**20 if run.peak_rss else None,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "median_step_ms": 1000 * statistics.median(step_times) if step_times else None,
        "median_iter_ms": 1000 * statistics.median(iter_times) if iter_times else None,
        "closure_calls": run.closure_calls if run.spec.needs_closure else None,
        "wall_s": run.wall,
        "trajectory": run.trajectory,
    }


def run_one(
    workload: Workload,
    optimizer: str,
    hyperparameters: dict[str, Any],
    seed: int,
    steps: int,
    eval_every: int,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one fresh task of ``workload`` for ``steps`` steps; return the run record.

    The record follows the ``runs`` entries of :mod:`microadam.bench.results`. A run whose
    loss turns non-finite (or MicroAdam's non-finite-gradient error) ends as ``diverged``;
    any other error in ``step`` ends it as ``failed`` with the message.
    """
    run = _set_up(workload, optimizer, hyperparameters, seed, steps, device)
    run.record_eval(0)
    step = _train(run, steps, eval_every, device, progress)
    final = _final_metrics(run, step)
    return _run_record(run, optimizer, hyperparameters, seed, final, device)


def warm_up(
    workload: Workload, optimizer: str, hyperparameters: dict[str, Any], device: str = "cpu"
) -> None:
    """Untimed steps on a throwaway task, so that one-time costs (a kernel compiled or
    loaded on first use, allocator and thread-pool start-up) stay out of every run's
    timings. Errors are left for the real runs to record."""
    spec = get_spec(optimizer)
    try:
        task = workload.make_task(0, device)
        opt = create_optimizer(optimizer, task.model, **hyperparameters)
        for _ in range(WARM_UP_STEPS):
            if spec.needs_closure:
                opt.step(_closure(opt, task, spec.target.startswith("torch.")))
            else:
                opt.zero_grad(set_to_none=True)
                task.batch_loss().backward()
                opt.step()
    except Exception:  # the timed runs report whatever goes wrong
        pass
    gc.collect()


# -- the bench: every optimizer x lr x seed -------------------------------------------------

# One planned run: (label, registry name, hyperparameters, seed).
_Planned = tuple[str, str, dict[str, Any], int]


def _parse_optimizers(
    workload: Workload, optimizers: list[str] | tuple[str, ...] | None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, registry name, overrides) of each optimizer, labels checked unique."""
    # Unknown or uninstalled names fail here, before any training.
    return parse_optimizers(optimizers or default_optimizers(workload.kind))


def _plan(
    workload: Workload,
    parsed: list[tuple[str, str, dict[str, Any]]],
    extra: dict[str, dict[str, Any]],
    lr_factors: tuple[float, ...] | None,
    lrs: tuple[float, ...] | None,
    seeds: list[int] | tuple[int, ...],
    num_params: int,
) -> tuple[list[dict[str, Any]], list[_Planned]]:
    """Each optimizer's entry of the results document (skipped, or its lr grid), and the
    runs to do: every lr of its grid x every seed."""
    table = workload.name if workload.name in BASE_LR else workload.kind
    entries, plan = [], []
    for label, base, overrides in parsed:
        spec = get_spec(base)
        entry: dict[str, Any] = {
            "name": label, "registry_name": base, "status": "ok", "reason": None,
            "needs_closure": spec.needs_closure, "lrs": [], "best_lr": None, "scores": [],
        }  # fmt: skip
        mine = {**extra.get(base, {}), **overrides}
        reason = workload.skip_reason(base, spec.needs_closure, num_params, mine)
        if reason:
            entry.update(status="skipped", reason=reason)
        else:
            entry["lrs"] = grid = lr_grid(base, table, lr_factors, lrs, mine)
            for lr in grid:
                hp = grid_hyperparameters(base, table, lr, mine)
                plan.extend((label, base, hp, seed) for seed in seeds)
        entries.append(entry)
    return entries, plan


def _run_plan(
    workload: Workload,
    plan: list[_Planned],
    steps: int,
    eval_every: int,
    device: str,
    show_progress: bool,
    runs: list[dict[str, Any]],
) -> None:
    """Do the planned runs in order, each optimizer warmed up before its first; each run's
    record is appended to ``runs`` as it finishes (so an interrupt keeps the finished ones)."""
    desc = f"bench {workload.name}"
    warmed: set[str] = set()
    with Progress(len(plan) * steps, desc, enabled=show_progress) as progress:
        for label, base, hp, seed in plan:
            if base not in warmed:
                progress.set_status(f"{base} warm-up")
                warm_up(workload, base, hp, device)
                warmed.add(base)
            progress.set_status(f"{label} lr={hp['lr']:g} seed={seed}")
            run = run_one(workload, base, hp, seed, steps, eval_every, device, progress)
            run["optimizer"] = label
            runs.append(run)
            gc.collect()


def _score(runs: list[dict[str, Any]]) -> float:
    """Median final validation metric over seeds; a diverged or failed seed counts as inf."""
    vals = [
        r["final"]["val"] if r["status"] == "ok" and finite(r["final"]["val"]) else math.inf
        for r in runs
    ]
    return statistics.median(vals) if vals else math.inf


def _choose_lr(entry: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Score each lr of the entry's grid and pick the best; an optimizer all of whose runs
    failed is marked failed. Only the lrs that ran count (all, unless the bench was
    interrupted)."""
    mine = [r for r in runs if r["optimizer"] == entry["name"]]
    if not mine:
        entry.update(status="skipped", reason="not run: the bench was interrupted", lrs=[])
        return
    entry["lrs"] = [lr for lr in entry["lrs"] if any(r["lr"] == lr for r in mine)]
    scores = [_score([r for r in mine if r["lr"] == lr]) for lr in entry["lrs"]]
    entry["scores"] = [s if math.isfinite(s) else None for s in scores]
    best = min(range(len(scores)), key=lambda i: scores[i])
    if math.isfinite(scores[best]):
        entry["best_lr"] = entry["lrs"][best]
    failed = [r for r in mine if r["status"] == "failed"]
    if failed and len(failed) == len(mine):
        entry.update(status="failed", reason=failed[0]["message"])


def _settings(
    workload: Workload,
    steps: int,
    seeds: list[int] | tuple[int, ...],
    eval_every: int,
    device: str,
    lr_factors: tuple[float, ...] | None,
    lrs: tuple[float, ...] | None,
    extra: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``settings`` of the results document: the budget and how the lr is chosen."""
    n = len(seeds)
    selection = (
        f"for each optimizer, the lr of its grid with the lowest median final validation "
        f"{workload.metric_label} over the {n} seed{'s' if n > 1 else ''} (a diverged seed "
        f"counts as infinite); the validation split both picks the lr and scores it"
    )
    return {
        "steps": steps,
        "seeds": list(seeds),
        "eval_every": eval_every,
        "device": device,
        "lr_factors": None if lrs else list(lr_factors or (1.0,)),
        "lrs": list(lrs) if lrs else None,
        "selection": selection,
        "warm_up": f"each optimizer first takes {WARM_UP_STEPS} untimed steps on a "
        "throwaway model (one-time kernel compilation and start-up costs excluded)",
        "hyperparameters": "library defaults except weight_decay=0 (where the optimizer "
        "has one), SGD momentum 0.9, closure-based methods one iteration per step "
        "(L-BFGS with strong Wolfe line search), Muon's AdamW part at "
        f"{MUON_ADAMW_RATIO} x its lr",
        "extra_hyperparameters": extra,
    }


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_bench`: ``results`` is the document of the runs that finished,
    with ``"interrupted": {"runs_done": N, "runs_planned": M}``."""

    def __init__(self, results: dict[str, Any]):
        super().__init__("the bench was interrupted")
        self.results = results


def run_bench(
    workload: Workload,
    optimizers: list[str] | tuple[str, ...] | None = None,
    *,
    steps: int = 200,
    seeds: list[int] | tuple[int, ...] = (0,),
    lr_factors: tuple[float, ...] | None = LR_FACTORS[3],
    lrs: tuple[float, ...] | None = None,
    eval_every: int | None = None,
    device: str = "cpu",
    extra_hyperparameters: dict[str, dict[str, Any]] | None = None,
    show_progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run every optimizer x lr x seed on ``workload``; return the results document.

    ``optimizers`` are registry names, or variants written ``NAME[KEY=VALUE,...]`` (e.g.
    ``"microadam[density=0.1]"``), each with its own label, so that configurations of one
    optimizer can be compared. ``extra_hyperparameters`` maps a registry name to keywords
    that override the bench's for it and its variants (e.g. ``{"microadam": {"density":
    0.05}}``). An ``lr`` in either fixes that optimizer's grid to one value. See
    :mod:`microadam.bench.results` for the document's schema. Interrupted (Ctrl-C), it
    raises :class:`BenchInterrupted` with the document of the runs that finished.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps} (expected an integer >= 1)")
    if not seeds:
        raise ValueError("Invalid seeds: expected at least one seed")
    parsed = _parse_optimizers(workload, optimizers)
    extra = {
        get_spec(k).name: check_hyperparameters(k, v, f"extra_hyperparameters for {k!r}")
        for k, v in (extra_hyperparameters or {}).items()
    }
    if eval_every is None:
        eval_every = max(1, steps // workload.evaluations)
    elif isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"Invalid eval_every: {eval_every} (expected an integer >= 1)")
    described = workload.describe()
    entries, plan = _plan(workload, parsed, extra, lr_factors, lrs, seeds, described["num_params"])
    runs: list[dict[str, Any]] = []
    interrupted = False
    try:
        _run_plan(workload, plan, steps, eval_every, device, show_progress, runs)
    except KeyboardInterrupt:
        interrupted = True
    for entry in entries:
        if entry["status"] == "ok":
            _choose_lr(entry, runs)
    results = {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "workload": described,
        "settings": _settings(workload, steps, seeds, eval_every, device, lr_factors, lrs, extra),
        "optimizers": entries,
        "runs": runs,
    }
    if interrupted:
        results["interrupted"] = {"runs_done": len(runs), "runs_planned": len(plan)}
        raise BenchInterrupted(results)
    return results
