"""Run registry optimizers on a workload: learning-rate grid x seeds, measured and recorded.

Every optimizer gets the same budget: the same number of steps, the same seeds and a grid
of the same number of learning rates (centred on a per-optimizer base rate, see
:data:`BASE_LR`). The best rate is chosen on the validation split (lowest median final
validation metric over the seeds) and the results file says so. Other hyperparameters are
the library defaults except: weight decay 0 wherever the optimizer has one (so that
AdamW-style decay does not favour one method), SGD with momentum 0.9, and one iteration
(with its line search) per step for the closure-based L-BFGS, BFGS and Newton, whose
closure evaluates the whole training set.
"""

from __future__ import annotations

import ast
import gc
import inspect
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Any

import torch

from microadam.bench.progress import Progress
from microadam.bench.results import SCHEMA, finite
from microadam.bench.workloads import Workload
from microadam.memory import state_bytes
from microadam.optim.registry import create_optimizer, get_spec

__all__ = [
    "BASE_LR",
    "DEFAULT_OPTIMIZERS",
    "LR_FACTORS",
    "base_hyperparameters",
    "default_optimizers",
    "environment",
    "lr_values",
    "run_bench",
    "run_one",
]

# Centre of each optimizer's lr grid, by workload (name, else kind). Closure-based methods:
# the initial step of the line search. Muon: its matrices' lr; the AdamW part's lr scales with it.
BASE_LR: dict[str, dict[str, float]] = {
    "function": {
        "sgd": 1e-3, "rmsprop": 1e-2, "adagrad": 1.0, "adadelta": 1.0, "adam": 0.1,
        "adamw": 0.1, "amsgrad": 0.1, "adafactor": 0.1, "microadam": 3e-2,
        "adapprox": 0.1, "muon": 0.1, "adamw8bit": 0.1, "adamw4bit": 0.1,
        "galore_adamw": 0.1, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    # The quadratic's curvature is at most 1, Rosenbrock's over 1000 along the valley walls.
    "quadratic": {
        "sgd": 0.3, "rmsprop": 1e-2, "adagrad": 1.0, "adadelta": 1.0, "adam": 0.1,
        "adamw": 0.1, "amsgrad": 0.1, "adafactor": 0.1, "microadam": 3e-2,
        "adapprox": 0.1, "muon": 0.1, "adamw8bit": 0.1, "adamw4bit": 0.1,
        "galore_adamw": 0.1, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    "tabular": {
        "sgd": 3e-2, "rmsprop": 1e-3, "adagrad": 3e-2, "adadelta": 1.0, "adam": 3e-3,
        "adamw": 3e-3, "amsgrad": 3e-3, "adafactor": 1e-2, "microadam": 3e-3,
        "adapprox": 3e-3, "muon": 2e-2, "adamw8bit": 3e-3, "adamw4bit": 3e-3,
        "galore_adamw": 3e-3, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    # The Adam family at 1e-3: with 3e-3 at the centre, the full and the quick lm runs both
    # chose the grid's lowest point (1e-3) for MicroAdam and AdamW alike.
    "lm": {
        "sgd": 0.3, "rmsprop": 1e-3, "adagrad": 1e-2, "adadelta": 1.0, "adam": 1e-3,
        "adamw": 1e-3, "amsgrad": 1e-3, "adafactor": 1e-2, "microadam": 1e-3,
        "adapprox": 1e-3, "muon": 2e-2, "adamw8bit": 1e-3, "adamw4bit": 1e-3,
        "galore_adamw": 1e-3,
    },
    # Fine-tuning from a pretrained model: the same centres; the full run's 5-point grid
    # spans 1.1e-4 to 9e-3 for the Adam family.
    "finetune": {
        "sgd": 0.1, "rmsprop": 1e-3, "adagrad": 1e-2, "adadelta": 1.0, "adam": 1e-3,
        "adamw": 1e-3, "amsgrad": 1e-3, "adafactor": 3e-3, "microadam": 1e-3,
        "adapprox": 1e-3, "muon": 2e-2, "adamw8bit": 1e-3, "adamw4bit": 1e-3,
        "galore_adamw": 1e-3,
    },
}  # fmt: skip

# Muon's AdamW part (embeddings, head, vectors) relative to its matrices' lr.
_MUON_ADAMW_RATIO = 0.15

# Multipliers of the base lr for a grid of n points.
LR_FACTORS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1 / 3, 1.0),
    3: (1 / 3, 1.0, 3.0),
    4: (1 / 9, 1 / 3, 1.0, 3.0),
    5: (1 / 9, 1 / 3, 1.0, 3.0, 9.0),
}

DEFAULT_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "function": ("microadam", "adam", "sgd", "adagrad", "lbfgs", "newton"),
    "tabular": ("microadam", "adamw", "sgd", "adafactor", "lbfgs"),
    "lm": ("microadam", "adamw", "adafactor"),
    # The memory-saving peers are added where installed (see default_optimizers).
    "finetune": ("microadam", "microadam[density=0.1]", "adamw", "adafactor"),
}
# Optional peers a fine-tuning bench compares where their packages are installed.
FINETUNE_PEERS = ("adamw8bit", "adamw4bit", "galore_adamw")


def default_optimizers(kind: str) -> list[str]:
    """The optimizers a workload of ``kind`` compares unless told otherwise."""
    from microadam.optim.registry import list_optimizers

    names = list(DEFAULT_OPTIMIZERS[kind])
    if kind == "finetune":
        installed = set(list_optimizers())
        names += [n for n in FINETUNE_PEERS if n in installed]
    return names


WARM_UP_STEPS = 2

# What Task.evaluate reports (a workload may leave out the accuracies and pretrain_val).
EVAL_KEYS = ("train", "val", "train_accuracy", "val_accuracy", "pretrain_val")

# A finite loss this many times its starting value (plus one) ends the run as diverged.
DIVERGENCE_FACTOR = 1e6


def _nice(x: float) -> float:
    """Round to two significant digits (3e-3 / 3 is 1e-3, not 0.0009999...)."""
    return float(f"{x:.2g}")


def base_hyperparameters(name: str, kind: str) -> dict[str, Any]:
    """The bench's hyperparameters for optimizer ``name`` on a workload of ``kind`` (a
    workload name with its own row in :data:`BASE_LR`, or its kind)."""
    spec = get_spec(name)
    hp: dict[str, Any] = {"lr": BASE_LR.get(kind, {}).get(spec.name, 1e-3)}
    params = inspect.signature(spec.load()).parameters
    if "weight_decay" in params:
        hp["weight_decay"] = 0.0
    if spec.name == "sgd":
        hp["momentum"] = 0.9
    if spec.name == "muon":
        hp["adamw_lr"] = _nice(hp["lr"] * _MUON_ADAMW_RATIO)
    if spec.needs_closure:
        hp["max_iter"] = 1
        if spec.name == "lbfgs":
            # torch's LBFGS gives its line search max_eval - 1 evaluations: 25, not 0.
            hp.update(line_search_fn="strong_wolfe", max_eval=26)
    return hp


def lr_values(
    name: str, kind: str, factors: tuple[float, ...] | None, lrs: tuple[float, ...] | None
) -> list[float]:
    """The lr grid of optimizer ``name``: explicit ``lrs``, or ``factors`` x its base lr."""
    if lrs:
        return [float(x) for x in lrs]
    base = base_hyperparameters(name, kind)["lr"]
    return [_nice(base * f) for f in (factors or (1.0,))]


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
    spec = get_spec(optimizer)
    torch.manual_seed(seed)  # the model, and any randomness an optimizer draws for its state
    task = workload.make_task(seed, device)
    opt = create_optimizer(optimizer, task.model, **hyperparameters)
    # torch.optim.LBFGS wants a closure that calls backward(); ours differentiate the loss.
    backward_in_closure = spec.target.startswith("torch.")
    scale = task.metric_scale
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    curve: dict[str, list] = {"step": [], "wall_s": [], "train_loss": []}
    evals: dict[str, list] = {"step": [], "wall_s": [], **{key: [] for key in EVAL_KEYS}}
    schedule = None
    if task.lr_scale is not None:
        scale_of = task.lr_scale
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: scale_of(i, steps))
    trajectory = [task.point()] if task.point is not None else None
    step_times: list[float] = []
    iter_times: list[float] = []
    closure_calls = 0
    status, message = "ok", None
    wall = 0.0
    peak_rss = _rss_bytes() or 0
    first_loss: float | None = None

    def record_eval(step: int) -> None:
        metrics = task.evaluate()
        evals["step"].append(step)
        evals["wall_s"].append(wall)
        for key in EVAL_KEYS:
            evals[key].append(metrics.get(key))

    record_eval(0)
    step = 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        try:
            if spec.needs_closure:
                calls = 0

                def closure() -> torch.Tensor:
                    nonlocal calls
                    calls += 1
                    opt.zero_grad(set_to_none=True)
                    loss = task.full_loss()
                    if backward_in_closure:
                        loss.backward()
                    return loss

                ts = time.perf_counter()
                loss = opt.step(closure)
                _sync(device)
                step_times.append(time.perf_counter() - ts)
                closure_calls += calls
            else:
                loss = task.batch_loss()
                peak_rss = max(peak_rss, _rss_bytes() or 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _sync(device)
                ts = time.perf_counter()
                opt.step()
                _sync(device)
                step_times.append(time.perf_counter() - ts)
            if schedule is not None:
                schedule.step()
        except RuntimeError as err:
            text = str(err)
            status = "diverged" if "non-finite" in text else "failed"
            message = f"step {step}: {text}"
            step -= 1
            break
        iter_times.append(time.perf_counter() - t0)
        wall += iter_times[-1]
        peak_rss = max(peak_rss, _rss_bytes() or 0)
        value = float(loss.detach()) * scale if isinstance(loss, torch.Tensor) else float(loss)
        curve["step"].append(step)
        curve["wall_s"].append(wall)
        curve["train_loss"].append(value)
        if trajectory is not None:
            trajectory.append(task.point())
        if progress is not None:
            progress.update()
        if first_loss is None:
            first_loss = value
        if not math.isfinite(value) or abs(value) > DIVERGENCE_FACTOR * (abs(first_loss) + 1):
            status = "diverged"
            message = f"step {step}: loss {value:.3g} (started at {first_loss:.3g})"
            break
        if step % eval_every == 0 and step != steps:
            record_eval(step)
    if progress is not None and step < steps:
        progress.update(steps - max(step, 0))

    final = None
    if status == "ok":
        record_eval(step)
        final = {k: evals[k][-1] for k in EVAL_KEYS}
        if not all(finite(v) for v in final.values() if v is not None):
            status, message = "diverged", f"step {step}: non-finite final metrics"
    has_acc = any(v is not None for v in evals["val_accuracy"])
    if not has_acc:
        evals["train_accuracy"] = evals["val_accuracy"] = None
        if final is not None:
            final["train_accuracy"] = final["val_accuracy"] = None
    if not any(v is not None for v in evals["pretrain_val"]):  # only fine-tuning has it
        del evals["pretrain_val"]
        if final is not None:
            del final["pretrain_val"]
    num_params = sum(p.numel() for p in task.model.parameters())
    sbytes = state_bytes(opt)
    record = {
        "optimizer": optimizer,
        "lr": hyperparameters.get("lr"),
        "seed": seed,
        "status": status,
        "message": message,
        "hyperparameters": _json_hp(hyperparameters),
        "steps_done": len(curve["step"]),
        "curve": curve,
        "evals": evals,
        "final": final if status == "ok" else None,
        "num_params": num_params,
        "state_bytes": sbytes,
        "state_bytes_per_param": sbytes / num_params,
        "peak_rss_mb": peak_rss / 2**20 if peak_rss else None,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "median_step_ms": 1000 * statistics.median(step_times) if step_times else None,
        "median_iter_ms": 1000 * statistics.median(iter_times) if iter_times else None,
        "closure_calls": closure_calls if spec.needs_closure else None,
        "wall_s": wall,
        "trajectory": trajectory,
    }
    return record


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

                def closure() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = task.full_loss()
                    if spec.target.startswith("torch."):
                        loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt.zero_grad(set_to_none=True)
                task.batch_loss().backward()
                opt.step()
    except Exception:  # the timed runs report whatever goes wrong
        pass
    gc.collect()


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,b=(2, 3)"`` -> ``["a=1", "b=(2, 3)"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_assignments(text: str, where: str) -> dict[str, Any]:
    """``"density=0.05,betas=(0.9, 0.99)"`` -> ``{"density": 0.05, "betas": (0.9, 0.99)}``.

    Values are Python literals where they parse as one, strings otherwise.
    """
    out: dict[str, Any] = {}
    for pair in split_top_level(text):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"Invalid {where}: {pair!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_optimizer(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"microadam[density=0.1]"`` -> ``("microadam[density=0.1]", "microadam", {...})``.

    A registry name, optionally with bracketed hyperparameters that make it a variant with
    its own label (so that one optimizer can be compared with itself).
    """
    text = text.strip()
    base, bracket, rest = text.partition("[")
    spec = get_spec(base.strip())
    if not bracket:
        return spec.name, spec.name, {}
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ValueError(f"Invalid optimizer {text!r} (expected NAME or NAME[KEY=VALUE,...])")
    overrides = parse_assignments(rest[:-1], f"optimizer {text!r}")
    return f"{spec.name}[{rest[:-1].strip()}]", spec.name, overrides


def _score(runs: list[dict[str, Any]]) -> float:
    """Median final validation metric over seeds; a diverged or failed seed counts as inf."""
    vals = [
        r["final"]["val"] if r["status"] == "ok" and finite(r["final"]["val"]) else math.inf
        for r in runs
    ]
    return statistics.median(vals) if vals else math.inf


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
    :mod:`microadam.bench.results` for the document's schema.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps} (expected an integer >= 1)")
    if not seeds:
        raise ValueError("Invalid seeds: expected at least one seed")
    # Unknown or uninstalled names fail here, before any training.
    parsed = [parse_optimizer(n) for n in (optimizers or default_optimizers(workload.kind))]
    labels = [label for label, _, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Invalid optimizers: {labels} (a name appears twice)")
    extra = {get_spec(k).name: dict(v) for k, v in (extra_hyperparameters or {}).items()}
    eval_every = eval_every or max(1, steps // workload.evaluations)
    described = workload.describe()
    num_params = described["num_params"]

    table = workload.name if workload.name in BASE_LR else workload.kind
    plan = []
    entries = []
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
            grid = lr_values(base, table, lr_factors, lrs)
            if "lr" in mine:
                grid = [float(mine["lr"])]
            entry["lrs"] = grid
            for lr in grid:
                hp = base_hyperparameters(base, table)
                if "adamw_lr" in hp:
                    hp["adamw_lr"] = _nice(lr * _MUON_ADAMW_RATIO)
                hp.update(mine)
                hp["lr"] = lr
                plan.extend((label, base, hp, seed) for seed in seeds)
        entries.append(entry)

    runs: list[dict[str, Any]] = []
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

    for entry in entries:
        if entry["status"] != "ok":
            continue
        mine = [r for r in runs if r["optimizer"] == entry["name"]]
        scores = [_score([r for r in mine if r["lr"] == lr]) for lr in entry["lrs"]]
        entry["scores"] = [s if math.isfinite(s) else None for s in scores]
        best = min(range(len(scores)), key=lambda i: scores[i])
        if math.isfinite(scores[best]):
            entry["best_lr"] = entry["lrs"][best]
        failed = [r for r in mine if r["status"] == "failed"]
        if failed and len(failed) == len(mine):
            entry.update(status="failed", reason=failed[0]["message"])

    n = len(seeds)
    selection = (
        f"for each optimizer, the lr of its grid with the lowest median final validation "
        f"{workload.metric_label} over the {n} seed{'s' if n > 1 else ''} (a diverged seed "
        f"counts as infinite); the validation split both picks the lr and scores it"
    )
    return {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "workload": described,
        "settings": {
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
            f"{_MUON_ADAMW_RATIO} x its lr",
            "extra_hyperparameters": extra,
        },
        "optimizers": entries,
        "runs": runs,
    }
