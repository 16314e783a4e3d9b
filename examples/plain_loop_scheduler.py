"""A plain PyTorch loop with MicroAdam and a learning-rate scheduler (warmup + cosine).

    python examples/plain_loop_scheduler.py
    python examples/plain_loop_scheduler.py --steps 2000 --tensor-lr

Any ``torch.optim.lr_scheduler`` drives MicroAdam as it drives AdamW: it writes
``param_group["lr"]`` (a float, or in place into a 0-d tensor when the optimizer was built
with ``lr=torch.tensor(...)``), and each ``step`` reads it. The script shows that the
schedule takes effect (the parameter change of a step divided by that step's lr stays of
the same size while the lr moves by orders of magnitude; at lr 0 nothing moves), and that
the scheduler's state goes into the checkpoint with the model's and the optimizer's: the
run resumed half way ends bit-identical to the straight one.
"""

from __future__ import annotations

import argparse
import io
import math

import torch

from microadam import MicroAdam


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    return x, y


def warmup_cosine(warmup: int, total: int):
    """lr factor: 0 -> 1 linearly over ``warmup`` steps, then cosine down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build(steps: int, lr: float, tensor_lr: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    opt = MicroAdam(
        model.parameters(),
        lr=torch.tensor(lr) if tensor_lr else lr,
        weight_decay=1e-4,
        density=0.1,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 10), steps))
    return model, opt, sched


def train(model, opt, sched, x, y, steps: range, log_every: int = 0) -> list[dict]:
    """Train over ``steps``; one record per step: lr used, loss, parameter change."""
    records = []
    for step in steps:
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        lr = float(opt.param_groups[0]["lr"])  # the lr this step uses
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        sched.step()
        change = float((after - before).norm())
        records.append({"step": step, "lr": lr, "loss": loss.item(), "change": change})
        if log_every and (step % log_every == 0 or step == steps[-1]):
            per_lr = change / lr if lr > 0 else float("nan")
            print(
                f"step {step:4d}  lr {lr:.2e}  loss {loss.item():.5f}  "
                f"|dp| {change:.2e}  |dp|/lr {per_lr:.3g}",
                flush=True,
            )
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--tensor-lr", action="store_true", help="pass lr as a 0-d tensor")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)

    x, y = make_problem()
    half = args.steps // 2
    model, opt, sched = build(args.steps, args.lr, args.tensor_lr)
    records = train(model, opt, sched, x, y, range(0, half), args.log_every)
    checkpoint = io.BytesIO()  # a file works the same (write it atomically: see
    torch.save(  # examples/resumable_training.py)
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        checkpoint,
    )
    records += train(model, opt, sched, x, y, range(half, args.steps), args.log_every)

    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    model2, opt2, sched2 = build(args.steps, args.lr, args.tensor_lr, seed=1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])  # without it the schedule would restart at 0
    resumed = train(model2, opt2, sched2, x, y, range(half, args.steps))
    identical = all(
        torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True)
    )
    print(
        f"loss {records[0]['loss']:.5f} -> {records[-1]['loss']:.5f}; resumed run identical: "
        f"{identical}; lr as used after resuming equals the straight run's: "
        f"{[r['lr'] for r in resumed] == [r['lr'] for r in records[half:]]}"
    )
    return {"records": records, "resumed": resumed, "identical": identical}


if __name__ == "__main__":
    main()
