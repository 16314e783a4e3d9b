"""Training that survives being killed: MicroAdam with crash-safe checkpoints.

    python examples/resumable_training.py --checkpoint run.pt            # start or resume
    python examples/resumable_training.py --checkpoint run.pt --steps 2000 --every 100

Every ``--every`` steps the script writes one checkpoint holding everything the rest of
the run depends on: the model, the optimizer (MicroAdam's window, error feedback and
stochastic-rounding seed are all in its state dict), the learning-rate scheduler, the step
and the random number generator (batches and dropout draw from it). Started again with the
same ``--checkpoint``, it resumes from the last one, and the run ends bit-identical to one
that was never interrupted (tests/test_kill_resume.py kills it with SIGKILL to check).

The checkpoint is written to a temporary file in the same directory, flushed to disk, and
renamed over the old one with ``os.replace``, which is atomic: a kill (or power loss) in
the middle of a write leaves the previous checkpoint intact, never half a file. Loading
uses ``torch.load(weights_only=True)``: the checkpoint holds only tensors and numbers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from microadam import MicroAdam


def make_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 4, generator=g))
    return x, y


def build(steps: int, lr: float):
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 4)
    )
    opt = MicroAdam(
        model.parameters(), lr=lr, weight_decay=1e-4, density=0.05, rounding="stochastic"
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    return model, opt, sched


def save_checkpoint(path: Path, **payload) -> None:
    """Write ``payload`` to ``path`` so that a kill at any moment leaves a whole file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them current
    os.replace(tmp, path)  # atomic: readers see the old checkpoint or the new one


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--final", type=Path, help="write the final model state here")
    parser.add_argument(
        "--step-delay", type=float, default=0.0, help="seconds to sleep per step (for demos)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    x, y = make_problem()
    torch.manual_seed(args.seed)
    model, opt, sched = build(args.steps, args.lr)
    start = 0
    if args.checkpoint.exists():
        ckpt = torch.load(args.checkpoint, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        print(f"resumed from step {start}", flush=True)

    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % args.every == 0 or done == args.steps:
            save_checkpoint(
                args.checkpoint,
                step=done,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                rng=torch.get_rng_state(),
                loss=loss.item(),
            )
        if done % 50 == 0:
            print(f"step {done}: loss {loss.item():.5f}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)
    if args.final is not None:
        save_checkpoint(args.final, model=model.state_dict())
    print(f"finished at step {args.steps}: loss {loss.item():.5f}", flush=True)


if __name__ == "__main__":
    main()
