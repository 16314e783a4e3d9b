"""The ``microadam`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from microadam.bench.lm import LMConfig, train_lm

    cfg = LMConfig(steps=args.steps, seed=args.seed, device=args.device)
    runs = {
        "adamw": {"lr": args.lr, "weight_decay": 0.0},
        "microadam": {"lr": args.lr, "weight_decay": 0.0},
    }
    print(
        f"Byte-level transformer on {cfg.corpus_bytes:,} bytes of Python's own standard "
        f"library, {cfg.steps} steps of batch {cfg.batch_size} x {cfg.context} bytes, lr {args.lr}",
        flush=True,
    )
    results = []
    for name, hp in runs.items():
        print(f"  training with {name} ...", flush=True)
        results.append(train_lm(name, hp, cfg))
    n = results[0].num_params
    print(f"\nmodel parameters: {n:,}\n")
    header = (
        f"{'optimizer':<11} {'train bpb':>9} {'val bpb':>8} {'state B/param':>13} {'step ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.optimizer:<11} {r.final_train_bpb:>9.3f} {r.final_val_bpb:>8.3f} "
            f"{r.state_bytes_per_param:>13.3f} {r.median_step_ms:>8.2f}"
        )
    print("\nbpb: bits per byte (lower is better); step ms: median optimizer.step() time.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microadam", description="MicroAdam and the optimizer canon, side by side."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quick MicroAdam vs AdamW run on a byte-level LM")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
