"""Pick MicroAdam's default ``topk_block_size`` (B) and ``quant_block_size`` (Q) by measurement.

Three measurements, each printed as a markdown table:

1. Speed on one large tensor. Median wall-clock time of ``MicroAdam.step`` (density 0.01,
   window_size 10, every other argument at its default) on a single float32 parameter of
   ``--numel`` elements (default 2**22, about 4M), for every B in {1024, ..., 32768} x Q in
   {32, 64, 128, 256, 4096, 100000}. ``torch.optim.AdamW`` (default for-loop path and
   ``fused=True``) runs in the same process as the baselines. Every optimizer is warmed up
   for ``window_size + 1`` steps first (so the window is full and every step costs what a
   steady-state step costs); then ``--reps`` rounds follow, each timing one step of every
   optimizer in a freshly shuffled order, so that machine load drifts hit all settings alike.
   Reported: median step time, ratio to the fastest MicroAdam setting, ratio to both AdamW
   variants, state bytes per parameter (measured with ``microadam.state_bytes``) and the
   effective density k/d. Note ``k_B = ceil(B * density)`` per block: at density 0.01 a
   block of 1024 keeps 11 (1.07%), a block of 4096 keeps 41 (1.001%).
2. Speed on a list of mixed-size tensors (``--mixed``, on by default): B in {1024, 4096,
   16384, 32768} x Q in {32, 64, 256, 100000} on the parameters of a small transformer-like
   stack (3.7M elements in 14 tensors of 10 to 1M elements), where per-tensor overhead and
   short tail blocks matter.
3. Quality. Training loss (cross-entropy on the whole training set, mean over ``--seeds``
   seeds) at a quarter and half of the run, at the end (mean ± std) and averaged over the
   last quarter (late spikes make the single final value noisy), and held-out accuracy, of
   a 64-256-256-10 ReLU MLP (85k parameters) on sklearn's digits (standardized features,
   80/20 split, batch 64, lr 1e-3, 600 steps, density 0.01), for a smaller B x Q grid, with
   AdamW (weight_decay 0) as the baseline. Per-tensor layouts matter here: the 256x256
   matrix is 4 blocks of 16384 or 64 blocks of 1024.

Run (from the repository root)::

    .venv/bin/python benchmarks/block_sizes.py            # full run, under ~10 minutes on 2 cores
    .venv/bin/python benchmarks/block_sizes.py --quick    # smoke test, well under a minute
    .venv/bin/python benchmarks/block_sizes.py --out block_sizes.json   # also dump raw numbers

Wall-clock numbers depend on the machine and on whatever else runs on it; only compare
numbers from one run (they are interleaved for exactly that reason). Timing uses one torch
thread by default (``--threads``): on a shared 2-core machine two threads per process
oversubscribe the cores and every optimizer then shows 5-20x outliers.

A Q that is not a power of two (100000) makes lcm(B, Q) exceed MicroAdam's aligned chunk, so
the step takes its two-pass path (the error is re-quantized in a second pass): that, not
the bucket count, is why Q = 100000 is slower than Q = 4096.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from microadam import MicroAdam, state_bytes

SPEED_TOPK = (1024, 2048, 4096, 8192, 16384, 32768)
SPEED_QUANT = (32, 64, 128, 256, 4096, 100000)
MIXED_TOPK = (1024, 4096, 16384, 32768)
MIXED_QUANT = (32, 64, 256, 100000)
QUALITY_TOPK = (1024, 4096, 16384)
QUALITY_QUANT = (32, 64, 256, 100000)
EVAL_EVERY = 25  # steps between evaluations of the whole-training-set loss (quality)

# A small transformer-like parameter list (3.7M elements): embeddings, attention and
# MLP matrices, LayerNorm weights and biases, a classifier head.
MIXED_SHAPES: tuple[tuple[int, ...], ...] = (
    (1000, 512),  # token embedding
    (512, 512),  # q
    (512, 512),  # k
    (512, 512),  # v
    (512, 512),  # out
    (512,),  # ln1 weight
    (512,),  # ln1 bias
    (2048, 512),  # mlp up
    (2048,),  # mlp up bias
    (512, 2048),  # mlp down
    (512,),  # mlp down bias
    (64,),  # a tiny vector
    (10, 512),  # head
    (10,),  # head bias
)


# --------------------------------------------------------------------------------------
# helpers


def effective_density(numels: Sequence[int], block: int, density: float) -> float:
    """k / d summed over tensors, with k = ceil(B * density) per full block (at least 1) and
    the proportional count for a short last block, as MicroAdam lays the window out."""

    def kept(n: int) -> int:
        return max(1, min(n, math.ceil(round(n * density, 9)))) if n > 0 else 0

    k = 0
    for n in numels:
        full, tail = divmod(n, block)
        k += full * kept(block) + kept(tail)
    return k / sum(numels)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def fmt_loss(x: float) -> str:
    """Four decimals, or scientific notation below 0.01 (converged runs reach 1e-5)."""
    return f"{x:.4f}" if x >= 0.01 else f"{x:.2e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# speed


def time_interleaved(
    optimizers: dict[str, torch.optim.Optimizer],
    set_grads: Callable[[int], None],
    warmup: int,
    reps: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-step wall-clock times of every optimizer, one step each per round, shuffled.

    ``set_grads(i)`` installs the i-th gradient set on the (shared) parameters before each
    step; the gradients are precomputed, so their cost is not timed.
    """
    names = list(optimizers)
    for name in names:
        for i in range(warmup):
            set_grads(i)
            optimizers[name].step()
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    for r in range(reps):
        rng.shuffle(names)
        for name in names:
            set_grads(warmup + r)
            t0 = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - t0)
    return times


def speed_grid(
    shapes: Sequence[tuple[int, ...]],
    topk_sizes: Sequence[int],
    quant_sizes: Sequence[int],
    density: float,
    window_size: int,
    reps: int,
    num_grads: int = 4,
) -> dict:
    """Time MicroAdam over the B x Q grid and both AdamW variants on the same parameters."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(num_grads)]

    def set_grads(i: int) -> None:
        for p, g in zip(params, grads[i % num_grads], strict=True):
            p.grad = g

    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0),
        "adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
    }
    for b, q in itertools.product(topk_sizes, quant_sizes):
        optimizers[f"{b}/{q}"] = MicroAdam(
            params,
            lr=1e-3,
            density=density,
            window_size=window_size,
            topk_block_size=b,
            quant_block_size=q,
        )
    times = time_interleaved(optimizers, set_grads, warmup=window_size + 1, reps=reps)
    numels = [p.numel() for p in params]
    d = sum(numels)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = min(v for k, v in medians.items() if not k.startswith("adamw"))
    results = []
    for b, q in itertools.product(topk_sizes, quant_sizes):
        name = f"{b}/{q}"
        results.append(
            {
                "topk_block_size": b,
                "quant_block_size": q,
                "median_s": medians[name],
                "times_s": times[name],
                "vs_fastest": medians[name] / fastest,
                "vs_adamw": medians[name] / medians["adamw"],
                "vs_adamw_fused": medians[name] / medians["adamw_fused"],
                "state_bytes_per_param": state_bytes(optimizers[name]) / d,
                "effective_density": effective_density(numels, b, density),
            }
        )
    return {
        "shapes": [list(s) for s in shapes],
        "numel": d,
        "adamw": {"median_s": medians["adamw"], "times_s": times["adamw"]},
        "adamw_fused": {"median_s": medians["adamw_fused"], "times_s": times["adamw_fused"]},
        "adamw_state_bytes_per_param": state_bytes(optimizers["adamw"]) / d,
        "microadam": results,
    }


def print_speed(title: str, res: dict) -> None:
    print(f"\n### {title}\n")
    print(
        f"{res['numel']:,} float32 elements in {len(res['shapes'])} tensor(s). "
        f"AdamW (for-loop): {fmt_ms(res['adamw']['median_s'])} ms/step, "
        f"AdamW fused: {fmt_ms(res['adamw_fused']['median_s'])} ms/step, "
        f"{res['adamw_state_bytes_per_param']:.2f} state bytes/param.\n"
    )
    rows = [
        [
            r["topk_block_size"],
            r["quant_block_size"],
            fmt_ms(r["median_s"]),
            f"{r['vs_fastest']:.2f}",
            f"{r['vs_adamw']:.2f}",
            f"{r['vs_adamw_fused']:.1f}",
            f"{r['state_bytes_per_param']:.4f}",
            f"{100 * r['effective_density']:.3f}%",
        ]
        for r in res["microadam"]
    ]
    header = [
        "B (topk)",
        "Q (quant)",
        "median ms/step",
        "x fastest",
        "x AdamW",
        "x AdamW fused",
        "state B/param",
        "k/d",
    ]
    print(markdown_table(header, rows))
    # Compact view: ratio to the fastest setting, B down, Q across.
    qs = sorted({r["quant_block_size"] for r in res["microadam"]})
    bs = sorted({r["topk_block_size"] for r in res["microadam"]})
    cell = {(r["topk_block_size"], r["quant_block_size"]): r for r in res["microadam"]}
    print(f"\n{title}: median step time / fastest (B down, Q across)\n")
    print(
        markdown_table(
            ["B \\ Q", *map(str, qs)],
            [[b, *(f"{cell[b, q]['vs_fastest']:.2f}" for q in qs)] for b in bs],
        )
    )


# --------------------------------------------------------------------------------------
# quality


def load_digits_split() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    return (
        torch.tensor(scaler.transform(x_tr), dtype=torch.float32),
        torch.tensor(y_tr, dtype=torch.int64),
        torch.tensor(scaler.transform(x_te), dtype=torch.float32),
        torch.tensor(y_te, dtype=torch.int64),
    )


def make_mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def train_digits(
    data: tuple[torch.Tensor, ...],
    make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    seed: int,
    steps: int,
    batch_size: int,
) -> dict:
    """Train the MLP for ``steps`` steps; batches come from a seeded per-epoch permutation.

    The loss over the whole training set is recorded every ``EVAL_EVERY`` steps (``curve``).
    """
    x_tr, y_tr, x_te, y_te = data
    model = make_mlp(seed)
    opt = make_opt(list(model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    n = x_tr.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    curve: dict[int, float] = {}
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                curve[step] = torch.nn.functional.cross_entropy(model(x_tr), y_tr).item()
    with torch.no_grad():
        test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    late = [v for s, v in curve.items() if s > steps * 3 // 4]
    return {
        "train_loss": curve[steps],
        "late_mean_loss": statistics.mean(late),
        "curve": curve,
        "test_acc": test_acc,
        "state_bytes_per_param": state_bytes(opt) / sum(p.numel() for p in model.parameters()),
    }


def nearest_eval(step: int) -> int:
    """The evaluated step (a multiple of ``EVAL_EVERY``) closest to ``step``."""
    return max(EVAL_EVERY, round(step / EVAL_EVERY) * EVAL_EVERY)


def quality_grid(
    topk_sizes: Sequence[int],
    quant_sizes: Sequence[int],
    seeds: Sequence[int],
    steps: int,
    density: float,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> dict:
    data = load_digits_split()
    numels = [p.numel() for p in make_mlp(0).parameters()]
    settings: list[tuple[str, dict | None]] = [("AdamW", None)]
    settings += [
        (f"{b}/{q}", {"topk_block_size": b, "quant_block_size": q})
        for b, q in itertools.product(topk_sizes, quant_sizes)
    ]
    results = []
    for name, kw in settings:
        runs = []
        for seed in seeds:
            if kw is None:

                def make_opt(ps):
                    return torch.optim.AdamW(ps, lr=lr, weight_decay=0.0)

            else:

                def make_opt(ps, kw=kw):
                    return MicroAdam(ps, lr=lr, density=density, **kw)

            runs.append(train_digits(data, make_opt, seed, steps, batch_size))
        losses = [r["train_loss"] for r in runs]
        accs = [r["test_acc"] for r in runs]
        q1, q2 = nearest_eval(steps // 4), nearest_eval(steps // 2)
        results.append(
            {
                "name": name,
                **(kw or {}),
                "curves": [r["curve"] for r in runs],
                "loss_q1_step": q1,
                "loss_q1_mean": statistics.mean(r["curve"][q1] for r in runs),
                "loss_q2_step": q2,
                "loss_q2_mean": statistics.mean(r["curve"][q2] for r in runs),
                "late_mean_loss": statistics.mean(r["late_mean_loss"] for r in runs),
                "train_loss": losses,
                "test_acc": accs,
                "train_loss_mean": statistics.mean(losses),
                "train_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "test_acc_mean": statistics.mean(accs),
                "state_bytes_per_param": runs[0]["state_bytes_per_param"],
                "effective_density": (
                    effective_density(numels, kw["topk_block_size"], density) if kw else 1.0
                ),
            }
        )
        print(f"  quality: {name} done", file=sys.stderr, flush=True)
    return {
        "model": "64-256-256-10 MLP",
        "numel": sum(numels),
        "steps": steps,
        "seeds": list(seeds),
        "density": density,
        "results": results,
    }


def print_quality(res: dict) -> None:
    print(
        f"\n### Quality: {res['model']} on sklearn digits ({res['numel']:,} params), "
        f"{res['steps']} steps, batch 64, lr 1e-3, density {res['density']}, "
        f"{len(res['seeds'])} seeds\n"
    )
    first = res["results"][0]
    q1, q2 = first["loss_q1_step"], first["loss_q2_step"]
    print(
        "Training loss = cross-entropy over the whole training set (mean over seeds); "
        f"'late mean' averages the evaluations (every {EVAL_EVERY} steps) after step "
        f"{res['steps'] * 3 // 4}, which is less sensitive to single late spikes than the "
        "final value.\n"
    )
    header = [
        "optimizer (B/Q)",
        f"loss @ {q1}",
        f"loss @ {q2}",
        "final loss (mean ± std)",
        "late mean loss",
        "test acc",
        "state B/param",
        "k/d",
    ]
    rows = [
        [
            r["name"],
            fmt_loss(r["loss_q1_mean"]),
            fmt_loss(r["loss_q2_mean"]),
            f"{fmt_loss(r['train_loss_mean'])} ± {fmt_loss(r['train_loss_std'])}",
            fmt_loss(r["late_mean_loss"]),
            f"{100 * r['test_acc_mean']:.2f}%",
            f"{r['state_bytes_per_param']:.3f}",
            f"{100 * r['effective_density']:.3f}%",
        ]
        for r in res["results"]
    ]
    print(markdown_table(header, rows))


# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few reps (smoke test)")
    ap.add_argument("--numel", type=int, default=None, help="elements of the single tensor")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per setting")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads "
        "under load gave 5-20x outliers for every optimizer)",
    )
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--window-size", type=int, default=10)
    ap.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--steps", type=int, default=None, help="training steps (quality)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (quality)")
    ap.add_argument("--out", type=str, default=None, help="write raw numbers as JSON here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quick = args.quick
    numel = args.numel or (1 << 18 if quick else 1 << 22)
    reps = args.reps or (3 if quick else 13)
    steps = args.steps or (60 if quick else 600)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    topk = (1024, 4096, 32768) if quick else SPEED_TOPK
    quant = (32, 64, 100000) if quick else SPEED_QUANT
    q_topk = (1024, 16384) if quick else QUALITY_TOPK
    q_quant = (64, 100000) if quick else QUALITY_QUANT
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    print("## MicroAdam block sizes\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}; "
        f"density {args.density}, window_size {args.window_size}, quant_bits 4, bf16 values; "
        f"{reps} interleaved timed steps per setting after {args.window_size + 1} warm-up steps."
    )
    out: dict = {"args": vars(args), "torch": torch.__version__}

    out["speed_single"] = speed_grid([(numel,)], topk, quant, args.density, args.window_size, reps)
    print_speed(f"Speed: one tensor of {numel:,} elements", out["speed_single"])
    if args.mixed:
        shapes = MIXED_SHAPES[:5] if quick else MIXED_SHAPES
        m_topk, m_quant = (topk, quant) if quick else (MIXED_TOPK, MIXED_QUANT)
        out["speed_mixed"] = speed_grid(
            shapes, m_topk, m_quant, args.density, args.window_size, reps
        )
        print_speed("Speed: mixed-size tensors", out["speed_mixed"])
    if args.quality:
        out["quality"] = quality_grid(q_topk, q_quant, seeds, steps, args.density)
        print_quality(out["quality"])
    elapsed = time.perf_counter() - t_start
    out["elapsed_s"] = elapsed
    print(f"\n(total {elapsed:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
