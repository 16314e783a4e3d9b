"""The ``microadam`` command.

``microadam bench WORKLOAD`` compares registry optimizers on offline work and writes
``results.json``, PNG figures and ``report.md``; ``microadam plot`` redraws them from a
results file; ``microadam reproduce`` reruns the founding student report's experiments;
``microadam speed`` times optimizer steps against fused AdamW; ``microadam demo`` is
``microadam bench lm --quick``; ``microadam memory`` and ``microadam list`` print tables.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

WORKLOAD_NAMES = (
    "rosenbrock", "quadratic", "iris", "breast-cancer", "digits", "lm", "finetune",
    "finetune-digits",
)  # fmt: skip

# Per workload kind: (steps, seeds, lr-grid points) for a full and a --quick run.
FULL = {
    "function": (500, 3, 3),
    "tabular": (500, 3, 3),
    "lm": (300, 1, 3),
    "finetune": (1000, 3, 5),
}
QUICK = {
    "function": (200, 1, 3),
    "tabular": (200, 1, 2),
    "lm": (400, 1, 2),
    "finetune": (300, 1, 2),
}
KINDS = {
    "rosenbrock": "function", "quadratic": "function", "lm": "lm", "finetune": "finetune",
    "finetune-digits": "finetune",
}  # fmt: skip
# The workload options (dest, flag) of the lm and function workloads, which finetune-digits
# refuses rather than ignores.
_NOT_FOR_DIGITS = (
    ("context", "--context"), ("d_model", "--d-model"), ("layers", "--layers"),
    ("heads", "--heads"), ("corpus_bytes", "--corpus-bytes"), ("text", "--text"),
    ("dim", "--dim"), ("condition", "--condition"),
)  # fmt: skip
# What `finetune --quick` (and so `make demo`) compares.
FINETUNE_QUICK_OPTIMIZERS = ("microadam", "adamw", "adafactor")

# The lm model's sizes for `microadam memory` (see microadam.bench.memory_table).
MODEL_SIZES = ("small", "medium", "large")


def _err(message: str) -> int:
    print(f"microadam: error: {message}", file=sys.stderr)
    return 2


def parse_hp(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["microadam:density=0.05,window_size=20"]`` -> ``{"microadam": {...}}``."""
    from microadam.bench.runner import parse_assignments

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not rest:
            raise ValueError(f"Invalid --hp {item!r} (expected NAME:KEY=VALUE[,KEY=VALUE])")
        out.setdefault(name.strip(), {}).update(parse_assignments(rest, f"--hp {item!r}"))
    return out


def _hidden(args: argparse.Namespace) -> tuple[int, ...] | None:
    if args.hidden is None:
        return None
    return tuple(int(h) for h in args.hidden.split(",") if h.strip())


def _workload_options(args: argparse.Namespace) -> dict[str, Any]:
    name = args.workload
    if name == "finetune-digits":
        given = [flag for dest, flag in _NOT_FOR_DIGITS if getattr(args, dest) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to "
                "finetune-digits (its options: --hidden, --batch-size, --pretrain-steps)"
            )
        return {
            "hidden": _hidden(args),
            "batch_size": args.batch_size,
            "pretrain_steps": args.pretrain_steps,
            "show_progress": not args.quiet,
        }
    if name in ("rosenbrock", "quadratic"):
        opts = {"dim": args.dim}
        if name == "quadratic":
            opts["condition"] = args.condition
        return opts
    if name == "finetune":
        from microadam.bench.finetune import FINETUNE_DEFAULT, FINETUNE_QUICK

        opts = {
            "config": FINETUNE_QUICK if args.quick else FINETUNE_DEFAULT,
            "context": args.context,
            "d_model": args.d_model,
            "n_layer": args.layers,
            "n_head": args.heads,
            "batch_size": args.batch_size,
            "corpus_bytes": args.corpus_bytes,
            "text_path": args.text,
            "pretrain_steps": args.pretrain_steps,
        }
        return {**opts, "show_progress": not args.quiet}
    if name == "lm":
        from microadam.bench.lm import LM_DEFAULT, LM_QUICK

        base = LM_QUICK if args.quick else LM_DEFAULT
        return {
            "config": base,
            "context": args.context,
            "d_model": args.d_model,
            "n_layer": args.layers,
            "n_head": args.heads,
            "batch_size": args.batch_size,
            "corpus_bytes": args.corpus_bytes,
            "text_path": args.text,
        }
    return {"hidden": _hidden(args), "batch_size": args.batch_size}


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from microadam.bench import plots
    from microadam.bench.report import text_table, write_report
    from microadam.bench.results import save_results
    from microadam.bench.runner import (
        LR_FACTORS,
        default_optimizers,
        run_bench,
        split_top_level,
    )
    from microadam.bench.workloads import make_workload

    kind = KINDS.get(args.workload, "tabular")
    # One thread unless asked: small models gain little from more, and on a busy machine
    # (or 2 cores shared with other work) OpenMP threads that wait on each other turn a
    # step 10-50x slower. The full lm and finetune benches (a transformer) keep torch's
    # default; finetune-digits (an MLP of 25k parameters) ran 13x slower on 2 threads.
    threads = args.threads or (0 if args.workload in ("lm", "finetune") and not args.quick else 1)
    if threads:
        torch.set_num_threads(threads)
    steps, seeds, grid = (QUICK if args.quick else FULL)[kind]
    steps = args.steps or steps
    seeds = list(range(args.seeds or seeds))
    grid = args.lr_grid or grid
    if grid not in LR_FACTORS:
        return _err(f"--lr-grid must be one of {sorted(LR_FACTORS)}, got {grid}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as err:  # e.g. "Torch not compiled with CUDA"
        return _err(f"device {args.device!r} is not usable here: {err}")
    try:
        lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else None
        extra = parse_hp(args.hp)
        workload = make_workload(args.workload, **_workload_options(args))
    except (ValueError, RuntimeError) as err:
        return _err(str(err))
    names = (
        [n.strip() for n in split_top_level(args.optimizers) if n.strip()]
        if args.optimizers
        else list(FINETUNE_QUICK_OPTIMIZERS)
        if kind == "finetune" and args.quick
        else default_optimizers(workload.kind)
    )
    out = Path(args.out or f"microadam-bench/{args.workload}")
    command = "microadam " + shlex.join(argv)
    if not args.quiet:
        n_params = workload.num_params()
        grid_text = f"lrs {list(lrs)}" if lrs else f"a {grid}-point lr grid per optimizer"
        print(
            f"bench {workload.name}: {n_params:,} parameters; {', '.join(names)}; "
            f"{steps} steps x {len(seeds)} seed(s) x {grid_text}; device {args.device}, "
            f"{torch.get_num_threads()} thread(s)",
            flush=True,
        )
    t0 = time.perf_counter()
    if kind == "finetune":
        workload.weights()  # pretrain (once, then from the cache) before the runs
        if not args.quiet:
            print(f"pretrained weights: {workload.pretrained_path}", flush=True)
            if hasattr(workload, "pretrained_summary"):
                print(workload.pretrained_summary(), flush=True)
    try:
        results = run_bench(
            workload,
            names,
            steps=steps,
            seeds=seeds,
            lr_factors=None if lrs else LR_FACTORS[grid],
            lrs=lrs,
            eval_every=args.eval_every,
            device=args.device,
            extra_hyperparameters=extra,
            show_progress=not args.quiet,
            command=command,
        )
    except ValueError as err:
        return _err(str(err))
    path = save_results(results, out / "results.json")
    figures = _figures(results, out, args.no_plots)
    report = write_report(results, out, figures)
    if not args.quiet:
        from microadam.bench.results import load_results

        results = load_results(path)
        print()
        print(text_table(results))
        w = results["workload"]
        print(
            f"\n{w['metric_label']} (lower is better), median [min, max] over seeds at each "
            "optimizer's best lr, chosen on the validation split; state B/param: "
            "optimizer-state bytes per parameter; step ms: median optimizer.step() time."
        )
        if not figures and not args.no_plots:
            print(f"\n{plots.MISSING}")
        print(f"\nwrote {path}, {report} and {len(figures)} figure(s) in {out}/ "
              f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return 0


def _figures(results: dict[str, Any], out: Path, no_plots: bool) -> list[Path]:
    from microadam.bench import plots

    if no_plots:
        return []
    return plots.plot_all(results, out)


def _plot(args: argparse.Namespace, argv: list[str]) -> int:
    from microadam.bench import plots
    from microadam.bench.report import text_table, write_report
    from microadam.bench.results import load_results

    try:
        results = load_results(args.results)
    except (OSError, ValueError) as err:
        return _err(f"cannot read {args.results}: {err}")
    src = Path(args.results)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    figures = plots.plot_all(results, out)
    report = write_report(results, out, figures)
    print(text_table(results))
    if not figures:
        print(f"\n{plots.MISSING}")
    print(f"\nwrote {report} and {len(figures)} figure(s) in {out}/")
    return 0


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """Both regimes, quickly: training from scratch, then fine-tuning a pretrained model."""
    base = Path(args.out) if args.out else Path("microadam-bench")
    threads = ["--threads", str(args.threads)] if args.threads else []
    for workload, title in (
        ("lm", "from scratch: a byte-level GPT trained on the standard library's source"),
        ("finetune", "fine-tuning: that model pretrained with AdamW, then tuned on pydoc's "
         "help text"),
    ):  # fmt: skip
        print(f"\n== {title} ==", flush=True)
        code = main(["bench", workload, "--quick", "--out", str(base / workload), *threads])
        if code:
            return code
    return 0


def _memory(args: argparse.Namespace, argv: list[str]) -> int:
    from microadam.bench.memory_table import MODEL_SIZES as SIZES
    from microadam.bench.memory_table import memory_table

    names = args.optimizers.split(",") if args.optimizers else None
    sizes = args.sizes.split(",")
    for size in sizes:
        if size not in MODEL_SIZES:
            return _err(f"unknown size {size!r} (expected {', '.join(MODEL_SIZES)})")
    print("Optimizer-state bytes per parameter after one step on the byte-level transformer")
    print("(context 256; float32 parameters and gradients; closure-based methods: see the note)\n")
    table = memory_table(names, {s: SIZES[s] for s in sizes})
    print(table.markdown())
    return 0


def _list(args: argparse.Namespace, argv: list[str]) -> int:
    from microadam.optim.registry import all_specs

    print("| name | backed by | state bytes per parameter | needs a closure | installed |")
    print("| --- | --- | --- | --- | --- |")
    for spec in all_specs():
        name = spec.name
        print(
            f"| `{name}` | {spec.backed_by} | {spec.state_formula} | "
            f"{'yes' if spec.needs_closure else 'no'} | {'yes' if spec.available() else 'no'} |"
        )
    return 0


def _reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from microadam.bench.reproduce import FIGURES, reproduce

    torch.set_num_threads(args.threads or 1)
    figures = (
        [int(f) for f in args.figures.split(",") if f.strip()] if args.figures else list(FIGURES)
    )
    for f in figures:
        if f not in FIGURES:
            return _err(f"--figures: no figure {f} (expected some of {list(FIGURES)})")
    out = Path(args.out or "microadam-reproduce")
    report = reproduce(
        out,
        quick=args.quick,
        figures=figures,
        epochs=args.epochs,
        seeds=list(range(args.seeds)) if args.seeds else None,
        command="microadam " + shlex.join(argv),
        show_progress=not args.quiet,
        reuse=args.reuse,
    )
    if not args.quiet:
        print(f"wrote {report} and its figures in {out}/")
    return 0


def _add_bench(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="compare optimizers on offline workloads; results.json, PNGs, report.md",
        description="Train every requested optimizer on one workload with the same budget "
        "(steps x seeds x a small lr grid; the best lr chosen on the validation split), "
        "print a table and write results.json, PNG figures and report.md.",
    )
    b.add_argument("workload", choices=WORKLOAD_NAMES)
    b.add_argument(
        "--optimizers",
        default="",
        help="comma-separated registry names (see `microadam list`), or variants such as "
        "'microadam[density=0.1]'; default "
        "microadam,adamw,adafactor for lm, microadam,adamw,sgd,adafactor,lbfgs for the "
        "tabular data, microadam,adam,sgd,adagrad,lbfgs,newton for the functions",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run (default 500, lm 300; --quick 200, lm 400)",
    )
    b.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 3; lm 1)")
    b.add_argument(
        "--lr-grid", type=int, default=None, help="lr grid points per optimizer, 1-5 (default 3)"
    )
    b.add_argument("--lrs", default="", help="explicit comma-separated lrs for every optimizer")
    b.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="override hyperparameters, e.g. microadam:density=0.05 (repeatable)",
    )
    b.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    b.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    b.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default 1; torch's default for a full lm or finetune run)",
    )
    b.add_argument("--out", default=None, help="output folder (default microadam-bench/WORKLOAD)")
    b.add_argument("--quick", action="store_true", help="a short run (lm: a 0.28M-parameter model)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    b.add_argument("--quiet", action="store_true", help="print nothing, show no progress")
    g = b.add_argument_group("workload options")
    g.add_argument("--condition", type=float, default=None, help="quadratic: condition number")
    g.add_argument("--dim", type=int, default=None, help="rosenbrock/quadratic: dimension")
    g.add_argument("--hidden", default=None, help="iris/breast-cancer/digits: hidden sizes, "
                   "e.g. 32,32 ('' for a linear model); finetune-digits: the pretrained "
                   "body's (default 128,128)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size: tabular, lm; finetune, finetune-digits: of the "
                   "pretraining and the fine-tuning")  # fmt: skip
    g.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="lm: train on this text file; finetune: fine-tune on it (default pydoc's topics)",
    )
    g.add_argument("--context", type=int, default=None, help="lm: context length in bytes")
    g.add_argument("--d-model", type=int, default=None, help="lm: model width")
    g.add_argument("--layers", type=int, default=None, help="lm: transformer blocks")
    g.add_argument("--heads", type=int, default=None, help="lm: attention heads")
    g.add_argument("--corpus-bytes", type=int, default=None, help="lm: bytes of stdlib text")
    g.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="finetune: AdamW pretraining steps (default 8000, --quick 2000); "
        "finetune-digits: on digits 0-4 (default 1000); cached",
    )
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microadam", description="MicroAdam and the optimizer canon, side by side."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    plot = sub.add_parser("plot", help="redraw figures, table and report.md from results.json")
    plot.add_argument("results", help="a results.json, or the folder holding one")
    plot.add_argument("--out", default=None, help="output folder (default: the results' folder)")
    plot.set_defaults(func=_plot)
    rep = sub.add_parser(
        "reproduce",
        help="rerun the student report's experiments; PNGs and report.md",
        description="Rerun the seven figures of the student report that started the project "
        "(iris and breast cancer, batch 16, lr 1e-3, 1000 epochs, seeds 0-2; about 12 minutes "
        "on 2 CPU cores; --quick: 50 epochs, one seed, about a minute) and write each figure "
        "as a PNG, reproduce.json and report.md.",
    )
    rep.add_argument("--quick", action="store_true", help="a short version (about a minute)")
    rep.add_argument("--out", default=None, help="output folder (default microadam-reproduce)")
    rep.add_argument("--figures", default="", help="comma-separated figure numbers (1-7)")
    rep.add_argument("--epochs", type=int, default=None, help="override the epochs per run")
    rep.add_argument(
        "--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 3, --quick 1)"
    )
    rep.add_argument("--threads", type=int, default=0, help="torch threads (default 1)")
    rep.add_argument(
        "--reuse",
        default=None,
        metavar="FILE",
        help="take the runs of an earlier reproduce.json instead of training them again",
    )
    rep.add_argument("--quiet", action="store_true", help="print nothing, show no progress")
    rep.set_defaults(func=_reproduce)
    demo = sub.add_parser(
        "demo",
        help="the quick bench in both regimes: bench lm --quick, then bench finetune --quick",
    )
    demo.add_argument(
        "--out", default=None, help="output folder (default microadam-bench: lm/, finetune/)"
    )
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default 1)")
    demo.set_defaults(func=_demo)
    from microadam.bench import speed

    speed.add_parser(sub)
    listing = sub.add_parser("list", help="every registry name as a markdown table")
    listing.set_defaults(func=_list)
    memory = sub.add_parser("memory", help="optimizer-state bytes per parameter, by optimizer")
    memory.add_argument("--optimizers", default="", help="comma-separated names (default: all)")
    memory.add_argument("--sizes", default="medium", help=f"any of {', '.join(MODEL_SIZES)}")
    memory.set_defaults(func=_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        return args.func(args, argv)
    finally:  # commands set torch's thread count; a caller in Python gets its own back
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
