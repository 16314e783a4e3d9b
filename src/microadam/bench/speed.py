"""``microadam speed``: optimizer step time, side by side, as a ratio to fused AdamW.

For each case (one float32 matrix of about 1M, 25M or 100M elements, and the parameter
list of the bench's transformer scaled to about 25M parameters) every optimizer steps on
the same parameters and the same fixed gradients. Each optimizer is measured against
``torch.optim.AdamW(fused=True)`` in the same process, interleaved step for step after a
warm-up (which also absorbs one-time costs: MicroAdam's kernel build, torchao's compile),
so that a machine busy with other work slows both sides alike; the table reports the
median step time of each and their ratio, and the optimizer-state bytes per parameter
(:func:`microadam.memory.state_bytes`). Only fused AdamW and the optimizer being measured
hold state at any time, which keeps the 100M case within a few GB.

    microadam speed                                   # 1M, 25M, 100M and the model
    microadam speed --sizes 25M,model --repeats 20 --out speed.csv
    MICROADAM_CPU_ARCH=avx2 microadam speed --optimizers microadam   # the AVX2 build
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from microadam.bench.arguments import (
    check_out,
    error,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = ["OPTIMIZERS", "SpeedResult", "add_parser", "run_speed"]

# Label -> (registry name, extra keyword arguments). "adamw_fused" is the baseline.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "microadam": ("microadam", {"fused": True}),
    "microadam_reference": ("microadam", {"fused": False}),
    "adamw_fused": ("adamw", {"fused": True}),
    "adamw": ("adamw", {}),
    "adafactor": ("adafactor", {}),
    "adamw8bit": ("adamw8bit", {}),
    "adamw4bit": ("adamw4bit", {}),
    "galore_adamw": ("galore_adamw", {}),
}
BASELINE = "adamw_fused"
# The transformer of the "model" case: TinyGPT at d_model 640, 5 layers, context 256
# (25.1M parameters in 65 tensors of 640 to 1.6M elements).
MODEL = dict(context=256, d_model=640, n_layer=5, n_head=10)


@dataclass
class SpeedResult:
    """One optimizer on one case."""

    case: str
    optimizer: str
    num_params: int
    num_tensors: int
    step_ms: float | None  # median step time
    baseline_ms: float | None  # median fused-AdamW step time, interleaved with it
    ratio: float | None  # step_ms / baseline_ms
    state_bytes_per_param: float | None
    repeats: int
    threads: int
    note: str = ""


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '2.5k' -> 2500, '123' -> 123."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower())
    try:
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value < 1e12 or value != int(value):
        raise argparse.ArgumentTypeError(f"Invalid size: {text!r} (expected e.g. 1M, 25M, 4096)")
    return int(value)


def _labels(text: str) -> list[str]:
    """``--optimizers``: labels of :data:`OPTIMIZERS`, comma-separated."""
    labels = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [label for label in labels if label not in OPTIMIZERS]
    if unknown or not labels:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(OPTIMIZERS)}, got {text!r}")
    return labels


def _cases(text: str) -> list[str]:
    """``--sizes``: parameter counts (:func:`parse_size`) and/or ``model``, comma-separated."""
    cases = [s.strip() for s in text.split(",") if s.strip()]
    if not cases:
        raise argparse.ArgumentTypeError(f"expected sizes such as 1M,25M,model, got {text!r}")
    for case in cases:
        if case != "model":
            parse_size(case)
    return cases


def _matrix_shape(numel: int) -> tuple[int, int]:
    """A weight-like matrix of about numel elements: rows of 1024, so that every block
    size in play divides its length (torchao's 4-bit state needs multiples of 128, for
    instance) and Adafactor factors it as it would a layer's weight."""
    return (max(1, round(numel / 1024)), 1024)


def _build_case(case: str, seed: int = 0) -> tuple[Any, list[torch.nn.Parameter]]:
    """The parameters of a case (a module for the model case), with fixed gradients."""
    gen = torch.Generator().manual_seed(seed)
    if case == "model":
        from microadam.bench.models import TinyGPT

        torch.manual_seed(seed)
        target: Any = TinyGPT(**MODEL)
        params = [p for p in target.parameters() if p.requires_grad]
    else:
        shape = _matrix_shape(parse_size(case))
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        target = params = [p]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return target, params


def _make(label: str, target: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from microadam.optim.registry import create_optimizer

    name, extra = OPTIMIZERS[label]
    return create_optimizer(name, target, lr=lr, weight_decay=weight_decay, **extra)


def _timed(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _interleaved(
    baseline: torch.optim.Optimizer,
    opt: torch.optim.Optimizer,
    repeats: int,
    warmup: int,
    budget_s: float,
) -> tuple[list[float], list[float]]:
    """Step times of both optimizers, alternating which goes first, after warm-up steps.

    Warm-up takes ``warmup`` pairs, or fewer (at least 2) once a quarter of ``budget_s`` is
    spent; timing stops after ``repeats`` pairs, or after ``budget_s`` seconds once 3 pairs
    are in. MicroAdam's step costs more while its window fills (``window_size`` steps), so
    the default warm-up covers the default window."""
    start = time.perf_counter()
    for i in range(warmup):
        baseline.step()
        opt.step()
        if i >= 1 and time.perf_counter() - start > budget_s / 4:
            break
    base_t, opt_t = [], []
    start = time.perf_counter()
    for i in range(repeats):
        if i % 2:
            opt_t.append(_timed(opt.step))
            base_t.append(_timed(baseline.step))
        else:
            base_t.append(_timed(baseline.step))
            opt_t.append(_timed(opt.step))
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return base_t, opt_t


def run_speed(
    cases: list[str],
    labels: list[str],
    *,
    repeats: int = 20,
    warmup: int = 10,
    budget_s: float = 60.0,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[SpeedResult]:
    """Measure every optimizer of ``labels`` on every case (see the module docstring)."""
    from microadam.memory import state_bytes
    from microadam.optim.registry import get_spec

    results = []
    for case in cases:
        target, params = _build_case(case)
        n = sum(p.numel() for p in params)
        baseline = _make(BASELINE, target, lr, weight_decay)
        baseline.step()
        base_times: list[float] = []
        rows = []
        for label in labels:
            if label == BASELINE:
                continue
            progress(f"{case}: {label}")
            common = dict(case=case, optimizer=label, num_params=n, num_tensors=len(params))
            spec_name = OPTIMIZERS[label][0]
            try:
                get_spec(spec_name)  # raises if the peer is not installed
                opt = _make(label, target, lr, weight_decay)
                b, t = _interleaved(baseline, opt, repeats, warmup, budget_s)
            except Exception as err:  # a peer that does not run here is reported, not fatal
                rows.append(SpeedResult(**common, step_ms=None, baseline_ms=None, ratio=None,
                                        state_bytes_per_param=None, repeats=0,
                                        threads=torch.get_num_threads(),
                                        note=f"{type(err).__name__}: {err}"[:200]))  # fmt: skip
                continue
            base_times += b
            note = ""
            if label == "microadam":
                from microadam.kernels import micro_adam_cpu

                reason = micro_adam_cpu.unavailable_reason()
                # build_target says which build ran: -march=native, x86-64-v3 (AVX2), ...
                note = (
                    f"fused kernel (-march={micro_adam_cpu.build_target})"
                    if reason is None
                    else f"pure path ({reason})"
                )
            rows.append(
                SpeedResult(
                    **common,
                    step_ms=statistics.median(t) * 1e3,
                    baseline_ms=statistics.median(b) * 1e3,
                    ratio=statistics.median(t) / statistics.median(b),
                    state_bytes_per_param=state_bytes(opt) / n,
                    repeats=len(t),
                    threads=torch.get_num_threads(),
                    note=note,
                )
            )
            del opt
            gc.collect()
        base_ms = statistics.median(base_times) * 1e3 if base_times else None
        base = SpeedResult(
            case=case,
            optimizer=BASELINE,
            num_params=n,
            num_tensors=len(params),
            step_ms=base_ms,
            baseline_ms=base_ms,
            ratio=1.0 if base_ms else None,
            state_bytes_per_param=state_bytes(baseline) / n,
            repeats=len(base_times),
            threads=torch.get_num_threads(),
        )
        results.append(base)
        results += rows
        del baseline, target, params
        gc.collect()
    return results


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown_table(results: list[SpeedResult]) -> str:
    lines = [
        "| case | optimizer | step ms (median) | fused AdamW ms (same run) | x fused AdamW "
        "| state bytes/param | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.case == "model":
            case = f"model ({r.num_params / 1e6:.1f}M, {r.num_tensors} tensors)"
        else:
            case = f"{r.case} ({r.num_params:,})"
        lines.append(
            f"| {case} | {r.optimizer} | {_cell(r.step_ms, '.1f')} | {_cell(r.baseline_ms, '.1f')} "
            f"| {_cell(r.ratio, '.2f')} | {_cell(r.state_bytes_per_param, '.3f')} | {r.note} |"
        )
    return "\n".join(lines)


def write_results(results: list[SpeedResult], path: Path, meta: dict[str, Any]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in results)
    else:
        path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                   indent=2) + "\n")  # fmt: skip


def _speed(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    out = Path(args.out)
    problem = check_out(out, "--out", file=True)
    if problem:
        return error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels, cases = args.optimizers, args.sizes
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(
        f"Optimizer step time on the CPU ({torch.get_num_threads()} threads, torch "
        f"{torch.__version__}), lr {args.lr}, weight decay {args.weight_decay}; each optimizer "
        "interleaved with fused AdamW after warm-up\n",
        flush=True,
    )
    start = time.perf_counter()
    results = run_speed(
        cases,
        labels,
        repeats=args.repeats,
        warmup=args.warmup,
        budget_s=args.budget,
        lr=args.lr,
        weight_decay=args.weight_decay,
        progress=lambda msg: print(f"  measuring {msg} ...", flush=True),
    )
    from microadam.kernels import micro_adam_cpu

    meta["fused_kernel"] = micro_adam_cpu.unavailable_reason() or "loaded"
    meta["fused_kernel_build_s"] = micro_adam_cpu.build_seconds
    meta["fused_kernel_target"] = micro_adam_cpu.build_target  # see MICROADAM_CPU_ARCH
    meta["wall_s"] = time.perf_counter() - start
    print()
    print(markdown_table(results))
    if micro_adam_cpu.build_seconds is not None:
        print(
            f"\n(the fused kernel was compiled in this run: {micro_adam_cpu.build_seconds:.1f} s)"
        )
    write_results(results, out, meta)
    print(f"\nresults written to {out}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``speed`` subcommand on the ``microadam`` command's subparsers."""
    parser = subparsers.add_parser(
        "speed",
        help="optimizer step time at 1M/25M/100M parameters and on a model, vs fused AdamW",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--sizes",
        type=_cases,
        default="1M,25M,100M,model",
        help="comma-separated parameter counts (1M, 25M, 100M, ...) and/or 'model' "
        "(TinyGPT scaled to 25M parameters)",
    )
    parser.add_argument(
        "--optimizers",
        type=_labels,
        default=",".join(label for label in OPTIMIZERS if label != BASELINE),
        help=f"comma-separated, of: {', '.join(OPTIMIZERS)} (fused AdamW is always measured)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=20, help="interleaved steps per optimizer"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=10,
        help="untimed steps of each first (fewer, at least 2, past a quarter of the budget)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", type=positive_float, default=60.0,
        help="seconds per optimizer and case after which fewer repeats are kept (at least 3)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0, the default: as is)"
    )
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--out", default="speed.json", help="results file (.json, or .csv for a flat table)"
    )
    parser.set_defaults(func=_speed)
