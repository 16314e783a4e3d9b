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


MODEL_SIZES = {
    "small": dict(d_model=128, n_layer=4, n_head=4),
    "medium": dict(d_model=256, n_layer=4, n_head=4),
    "large": dict(d_model=384, n_layer=6, n_head=6),
}


def _memory(args: argparse.Namespace) -> int:
    import torch

    from microadam.bench.models import TinyGPT
    from microadam.memory import state_bytes
    from microadam.optim.registry import create_optimizer, get_spec, list_optimizers

    names = args.optimizers.split(",") if args.optimizers else list_optimizers()
    sizes = args.sizes.split(",")
    print("Optimizer-state bytes per parameter after one step on the byte-level transformer")
    print("(context 256; parameters and gradients float32; closure-based methods skipped)\n")
    models = {}
    for size in sizes:
        torch.manual_seed(0)
        models[size] = TinyGPT(context=256, **MODEL_SIZES[size])
    counts = [
        f"{size} ({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M)"
        for size, m in models.items()
    ]
    print("| optimizer | " + " | ".join(counts) + " |")
    print("| --- |" + " --- |" * len(sizes))
    for name in names:
        if get_spec(name).needs_closure:
            continue
        cells = []
        for model in models.values():
            opt = create_optimizer(name, model)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            n = sum(p.numel() for p in model.parameters())
            cells.append(f"{state_bytes(opt) / n:.3f}")
            del opt
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def _list(args: argparse.Namespace) -> int:
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
    listing = sub.add_parser("list", help="every registry name as a markdown table")
    listing.set_defaults(func=_list)
    memory = sub.add_parser("memory", help="optimizer-state bytes per parameter, by optimizer")
    memory.add_argument("--optimizers", default="", help="comma-separated names (default: all)")
    memory.add_argument("--sizes", default="medium", help=f"any of {', '.join(MODEL_SIZES)}")
    memory.set_defaults(func=_memory)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
