"""A plain training loop with MicroAdam, a learning-rate schedule and checkpoint resume.

    python examples/train_loop.py            # trains, saves a checkpoint half way, resumes

The model is a small MLP fitted to a fixed random regression problem, so the example runs
anywhere in a few seconds with nothing but torch installed.
"""

from __future__ import annotations

import io

import torch

from microadam import MicroAdam, state_bytes


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g)
    y = torch.sin(x @ torch.randn(32, 1, generator=g))
    return x, y


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    opt = MicroAdam(model.parameters(), lr=3e-3, weight_decay=1e-4, density=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    return model, opt, sched


def train(model, opt, sched, x, y, steps: range) -> float:
    loss = torch.tensor(float("nan"))
    for step in steps:
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def main() -> None:
    x, y = make_problem()
    model, opt, sched = build()
    train(model, opt, sched, x, y, range(0, 200))
    checkpoint = io.BytesIO()  # a file path works the same way
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        checkpoint,
    )
    final = train(model, opt, sched, x, y, range(200, 400))

    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    model2, opt2, sched2 = build(seed=1)  # different init: everything comes from the checkpoint
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    resumed = train(model2, opt2, sched2, x, y, range(200, 400))

    n = sum(p.numel() for p in model.parameters())
    print(f"final loss {final:.5f}, resumed run {resumed:.5f} (identical: {final == resumed})")
    print(f"optimizer state: {state_bytes(opt) / n:.3f} bytes per parameter")


if __name__ == "__main__":
    main()
