"""The ``microadam`` command.

``microadam bench WORKLOAD`` compares registry optimizers on offline work and writes
``results.json``, PNG figures and ``report.md``; ``microadam plot`` redraws them from a
results file; ``microadam reproduce`` reruns the founding student report's experiments;
``microadam speed`` times optimizer steps against fused AdamW; ``microadam demo`` is
``microadam bench lm --quick``; ``microadam memory`` and ``microadam list`` print tables.

Bad input is refused before any work with ``microadam: error: ...`` (or argparse's
``microadam CMD: error: argument --OPTION: ...``) and exit status 2. Ctrl-C exits with 130
(``bench`` first saves the runs that finished); output cut off by a closed pipe
(``microadam list | head -1``) with 1, silently.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from microadam.bench.arguments import (
    check_out,
    checked_type,
    error,
    non_negative_int,
    positive_int,
)

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
# The workloads that take each workload option (by its dest); the others refuse it rather
# than ignore it.
_TABULAR = ("iris", "breast-cancer", "digits")
_LM = ("lm", "finetune")
WORKLOAD_OPTIONS: dict[str, tuple[str, ...]] = {
    "condition": ("quadratic",),
    "dim": ("rosenbrock", "quadratic"),
    "hidden": (*_TABULAR, "finetune-digits"),
    "batch_size": (*_TABULAR, *_LM, "finetune-digits"),
    "text": _LM,
    "context": _LM, "d_model": _LM, "layers": _LM, "heads": _LM, "corpus_bytes": _LM,
    "pretrain_steps": ("finetune", "finetune-digits"),
}  # fmt: skip
# make_workload's keyword for an option, where it is not the option's dest.
_WORKLOAD_KEYWORDS = {"layers": "n_layer", "heads": "n_head", "text": "text_path"}
# What `finetune --quick` (and so `make demo`) compares.
FINETUNE_QUICK_OPTIMIZERS = ("microadam", "adamw", "adafactor")

# The lm model's sizes for `microadam memory` (see microadam.bench.memory_table).
MODEL_SIZES = ("small", "medium", "large")


_condition_number = checked_type(float, lambda v: 1 <= v < math.inf, "a number >= 1")


def _hidden_sizes(text: str) -> tuple[int, ...]:
    """``--hidden``: ``"32,32"`` -> ``(32, 32)``; ``""`` -> ``()`` (a linear model)."""
    try:
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
    except ValueError:
        sizes = (0,)
    if any(h < 1 for h in sizes):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers ('' for a linear model), got {text!r}"
        )
    return sizes


def _learning_rates(text: str) -> tuple[float, ...]:
    """``--lrs``: ``"1e-3,3e-3"`` -> ``(0.001, 0.003)``, every one positive."""
    lrs = []
    for part in text.split(","):
        try:
            lr = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number") from None
        if not 0 < lr < math.inf:
            raise argparse.ArgumentTypeError(f"learning rates must be positive, got {part.strip()}")
        lrs.append(lr)
    return tuple(lrs)


def _optimizer_names(text: str) -> list[str]:
    """``--optimizers``: comma-separated names or variants, at least one."""
    from microadam.bench.grid import split_top_level

    names = [n.strip() for n in split_top_level(text) if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected at least one optimizer name, got {text!r}")
    return names


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- bench ----------------------------------------------------------------------------------


def parse_hp(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["microadam:density=0.05,window_size=20"]`` -> ``{"microadam": {...}}``, each key
    checked against what the optimizer takes."""
    from microadam.bench.grid import check_hyperparameters, parse_assignments

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not rest:
            raise ValueError(f"Invalid --hp {item!r} (expected NAME:KEY=VALUE[,KEY=VALUE])")
        where = f"--hp {item!r}"
        hp = check_hyperparameters(name.strip(), parse_assignments(rest, where), where)
        out.setdefault(name.strip(), {}).update(hp)
    return out


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _foreign_options(args: argparse.Namespace) -> str | None:
    """The error for workload options given to a workload that does not take them."""
    name = args.workload
    takes = [d for d, names in WORKLOAD_OPTIONS.items() if name in names]
    given = [_flag(d) for d in WORKLOAD_OPTIONS if d not in takes and getattr(args, d) is not None]
    if not given:
        return None
    verb = "does" if len(given) == 1 else "do"
    own = ", ".join(map(_flag, takes))
    return f"{', '.join(given)} {verb} not apply to {name} (its options: {own})"


def _text_problem(args: argparse.Namespace) -> str | None:
    from microadam.bench.data import file_problem

    problem = args.text is not None and file_problem(args.text)
    return f"--text: {args.text!r} {problem}" if problem else None


def _workload_options(args: argparse.Namespace) -> dict[str, Any]:
    name = args.workload
    opts = {
        _WORKLOAD_KEYWORDS.get(dest, dest): getattr(args, dest)
        for dest, names in WORKLOAD_OPTIONS.items()
        if name in names
    }
    if name == "lm":
        from microadam.bench.lm import LM_DEFAULT, LM_QUICK

        opts["config"] = LM_QUICK if args.quick else LM_DEFAULT
    elif name == "finetune":
        from microadam.bench.finetune import FINETUNE_DEFAULT, FINETUNE_QUICK

        opts["config"] = FINETUNE_QUICK if args.quick else FINETUNE_DEFAULT
    if name in ("finetune", "finetune-digits"):
        opts["show_progress"] = not args.quiet
    return opts


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from microadam.bench import plots
    from microadam.bench.grid import LR_FACTORS, default_optimizers, parse_optimizers
    from microadam.bench.report import text_table, write_report
    from microadam.bench.results import save_results
    from microadam.bench.runner import BenchInterrupted, run_bench
    from microadam.bench.workloads import make_workload

    out = Path(args.out or f"microadam-bench/{args.workload}")
    problem = _foreign_options(args) or _text_problem(args)
    if problem:
        return error(problem)
    try:
        extra = parse_hp(args.hp)
    except ValueError as err:
        return error(str(err))
    if args.optimizers is not None:
        try:
            parse_optimizers(args.optimizers)
        except ValueError as err:
            return error(f"--optimizers: {err}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as err:  # e.g. "Torch not compiled with CUDA"
        return error(f"--device: {args.device!r} is not usable here: {err}")
    problem = check_out(out, "--out")
    if problem:
        return error(problem)

    kind = KINDS.get(args.workload, "tabular")
    # One thread unless asked (--threads 0 means this default): small models gain little
    # from more, and on a busy machine (or 2 cores shared with other work) OpenMP threads
    # that wait on each other turn a step 10-50x slower. The full lm and finetune benches (a
    # transformer) keep torch's default; finetune-digits (an MLP of 25k parameters) ran 13x
    # slower on 2 threads.
    threads = args.threads or (0 if args.workload in ("lm", "finetune") and not args.quick else 1)
    if threads:
        torch.set_num_threads(threads)
    steps, seeds, grid = (QUICK if args.quick else FULL)[kind]
    steps = _given(args.steps, steps)
    seeds = list(range(_given(args.seeds, seeds)))
    grid = _given(args.lr_grid, grid)
    lrs = args.lrs
    try:
        workload = make_workload(args.workload, **_workload_options(args))
    except (ValueError, RuntimeError) as err:
        return error(str(err))
    if args.optimizers is not None:
        names = args.optimizers
    elif kind == "finetune" and args.quick:
        names = list(FINETUNE_QUICK_OPTIMIZERS)
    else:
        names = default_optimizers(workload.kind)
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
    except BenchInterrupted as stop:
        path = save_results(stop.results, out / "results.json")
        done = stop.results["interrupted"]
        print(
            f"interrupted: partial results ({done['runs_done']} of {done['runs_planned']} "
            f"runs) in {path}",
            file=sys.stderr,
        )
        return 130
    except ValueError as err:
        return error(str(err))
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


# -- the other commands ---------------------------------------------------------------------


def _plot(args: argparse.Namespace, argv: list[str]) -> int:
    from microadam.bench import plots
    from microadam.bench.report import text_table, write_report
    from microadam.bench.results import load_results

    try:
        results = load_results(args.results)
    except (OSError, ValueError) as err:
        return error(f"cannot read {args.results}: {err}")
    src = Path(args.results)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent)
    problem = check_out(out, "--out")
    if problem:
        return error(problem)
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
    problem = check_out(base, "--out")
    if problem:
        return error(problem)
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
    from microadam.optim.registry import get_spec

    for name in args.optimizers or ():
        try:
            get_spec(name)
        except ValueError as err:
            return error(f"--optimizers: {err}")
    sizes = args.sizes.split(",")
    for size in sizes:
        if size not in MODEL_SIZES:
            return error(f"--sizes: unknown size {size!r} (expected {', '.join(MODEL_SIZES)})")
    print("Optimizer-state bytes per parameter after one step on the byte-level transformer")
    print("(context 256; float32 parameters and gradients; closure-based methods: see the note)\n")
    table = memory_table(args.optimizers, {s: SIZES[s] for s in sizes})
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


def _figure_numbers(text: str | None, known: dict[int, str]) -> list[int] | None:
    """``--figures``: ``"1,6"`` -> ``[1, 6]`` (None: all); refused (ValueError) unless known."""
    if text is None:
        return list(known)
    try:
        figures = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        figures = []
    if not figures or any(f not in known for f in figures):
        raise ValueError(f"expected some of {list(known)}, got {text!r}")
    return figures


def _reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from microadam.bench.reproduce import FIGURES, reproduce
    from microadam.bench.reproduce.runs import read_saved

    try:
        figures = _figure_numbers(args.figures, FIGURES)
    except ValueError as err:
        return error(f"--figures: {err}")
    try:
        saved = None if args.reuse is None else read_saved(args.reuse)
    except ValueError as err:
        return error(f"--reuse: {err}")
    out = Path(args.out or "microadam-reproduce")
    problem = check_out(out, "--out")
    if problem:
        return error(problem)
    torch.set_num_threads(args.threads or 1)
    report = reproduce(
        out,
        quick=args.quick,
        figures=figures,
        epochs=args.epochs,
        seeds=None if args.seeds is None else list(range(args.seeds)),
        command="microadam " + shlex.join(argv),
        show_progress=not args.quiet,
        reuse=saved,
    )
    if not args.quiet:
        print(f"wrote {report} and its figures in {out}/")
    return 0


# -- the parser -----------------------------------------------------------------------------


def _add_bench(sub: Any) -> None:
    from microadam.bench.grid import LR_FACTORS

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
        type=_optimizer_names,
        default=None,
        help="comma-separated registry names (see `microadam list`), or variants such as "
        "'microadam[density=0.1]'; default "
        "microadam,adamw,adafactor for lm, microadam,adamw,sgd,adafactor,lbfgs for the "
        "tabular data, microadam,adam,sgd,adagrad,lbfgs,newton for the functions",
    )
    b.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="steps per run (default 500, lm 300; --quick 200, lm 400)",
    )
    b.add_argument(
        "--seeds", type=positive_int, default=None, help="seeds 0 .. N-1 (default 3; lm 1)"
    )
    b.add_argument(
        "--lr-grid",
        type=checked_type(int, lambda n: n in LR_FACTORS, f"one of {sorted(LR_FACTORS)}"),
        default=None,
        help="lr grid points per optimizer, 1-5 (default 3)",
    )
    b.add_argument(
        "--lrs",
        type=_learning_rates,
        default=None,
        help="explicit comma-separated lrs for every optimizer",
    )
    b.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="override hyperparameters, e.g. microadam:density=0.05 or "
        "microadam:value_dtype=float32 (repeatable)",
    )
    b.add_argument(
        "--eval-every", type=positive_int, default=None, help="steps between evaluations"
    )
    b.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    b.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        help="torch threads (0, the default: 1, or torch's default for a full lm or finetune run)",
    )
    b.add_argument("--out", default=None, help="output folder (default microadam-bench/WORKLOAD)")
    b.add_argument("--quick", action="store_true", help="a short run (lm: a 0.28M-parameter model)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    b.add_argument("--quiet", action="store_true", help="print nothing, show no progress")
    g = b.add_argument_group(
        "workload options", "each for the workloads it names; the others refuse it"
    )
    g.add_argument("--condition", type=_condition_number, default=None,
                   help="quadratic: condition number (>= 1)")  # fmt: skip
    g.add_argument("--dim", type=positive_int, default=None, help="rosenbrock/quadratic: dimension")
    g.add_argument("--hidden", type=_hidden_sizes, default=None,
                   help="iris/breast-cancer/digits: hidden sizes, e.g. 32,32 ('' for a linear "
                   "model); finetune-digits: the pretrained body's (default 128,128)")  # fmt: skip
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="batch size: tabular, lm; finetune, finetune-digits: of the "
                   "pretraining and the fine-tuning")  # fmt: skip
    g.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="lm: train on this text file; finetune: fine-tune on it (default pydoc's topics)",
    )
    g.add_argument("--context", type=positive_int, default=None, help="lm: context length in bytes")
    g.add_argument("--d-model", type=positive_int, default=None, help="lm: model width")
    g.add_argument("--layers", type=positive_int, default=None, help="lm: transformer blocks")
    g.add_argument("--heads", type=positive_int, default=None, help="lm: attention heads")
    g.add_argument(
        "--corpus-bytes", type=positive_int, default=None, help="lm: bytes of stdlib text"
    )
    g.add_argument(
        "--pretrain-steps",
        type=positive_int,
        default=None,
        help="finetune: AdamW pretraining steps (default 8000, --quick 2000); "
        "finetune-digits: on digits 0-4 (default 1000); cached",
    )
    b.set_defaults(func=_bench)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("microadam")
    except PackageNotFoundError:  # run from a source tree that is not installed
        import microadam

        return getattr(microadam, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microadam", description="MicroAdam and the optimizer canon, side by side."
    )
    parser.add_argument("--version", action="version", version=f"microadam {_version()}")
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
    rep.add_argument(
        "--figures", default=None, help="comma-separated figure numbers (1-7; default all)"
    )
    rep.add_argument(
        "--epochs", type=positive_int, default=None, help="override the epochs per run"
    )
    rep.add_argument(
        "--seeds", type=positive_int, default=None, help="seeds 0 .. N-1 (default 3, --quick 1)"
    )
    rep.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0, the default: 1)"
    )
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
    demo.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch threads (0, the default: 1)"
    )
    demo.set_defaults(func=_demo)
    from microadam.bench import speed

    speed.add_parser(sub)
    listing = sub.add_parser("list", help="every registry name as a markdown table")
    listing.set_defaults(func=_list)
    memory = sub.add_parser("memory", help="optimizer-state bytes per parameter, by optimizer")
    memory.add_argument(
        "--optimizers",
        type=_optimizer_names,
        default=None,
        help="comma-separated names (default: all)",
    )
    memory.add_argument("--sizes", default="medium", help=f"any of {', '.join(MODEL_SIZES)}")
    memory.set_defaults(func=_memory)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that the interpreter's flush at
    exit does not fail again (the recipe of Python's ``signal`` documentation)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout with no file behind it
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    try:
        code = args.func(args, argv)
        sys.stdout.flush()  # a reader that has gone shows here rather than at exit
        return code
    except BrokenPipeError:  # `microadam list | head -1`: the output was cut short
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print("microadam: interrupted", file=sys.stderr)
        return 130
    finally:  # commands set torch's thread count; a caller in Python gets its own back
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
