"""The student report's training setup, rebuilt: small classifiers trained for epochs.

Settings (the report's): iris with a single linear layer on the raw features; breast
cancer with a 30-8-2 ReLU MLP on standardized features (or raw ones, :data:`BC_RAW`);
mini-batches of 16 in a fresh random order every epoch, the last short batch kept (as
``torch.utils.data.DataLoader(shuffle=True)`` does); lr 1e-3; weight decay 0. Data are
split 80/20 (stratified, split seed 0), the loss curve is the cross-entropy over the whole
training split after every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from microadam.bench.tabular import TabularData, load_tabular, mlp
from microadam.memory import state_bytes
from microadam.optim import NonFiniteGradientError

__all__ = ["BC", "BC_RAW", "IRIS", "Setup", "Variant", "instability", "train_classifier"]

# A spike: the training loss more than SPIKE_RATIO times its best so far, and above
# SPIKE_FLOOR nats (below it, float32 round-off of a converged loss is not a spike).
SPIKE_RATIO = 2.0
SPIKE_FLOOR = 1e-3


@dataclass(frozen=True)
class Setup:
    """A data set, its preprocessing and the model trained on it."""

    dataset: str
    standardize: bool
    hidden: tuple[int, ...]
    label: str

    def data(self) -> TabularData:
        return load_tabular(self.dataset, 0.2, self.standardize)


IRIS = Setup("iris", False, (), "iris, linear 4-3, raw features")
BC = Setup("breast-cancer", True, (8,), "breast cancer, MLP 30-8-2, standardized")
BC_RAW = Setup("breast-cancer", False, (8,), "breast cancer, MLP 30-8-2, raw features")


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration: ``adam`` (torch.optim.Adam) or ``microadam``."""

    label: str
    optimizer: str = "microadam"
    density: float = 1.0
    error_feedback: bool = False
    quant_bits: int = 4
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    window_size: int = 10

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        from microadam.optim.micro_adam import MicroAdam

        return MicroAdam(
            params, lr=self.lr, betas=self.betas, density=self.density,
            error_feedback=self.error_feedback, quant_bits=self.quant_bits,
            window_size=self.window_size,
        )  # fmt: skip

    def key(self) -> tuple:
        """What determines the run (the label does not)."""
        d = asdict(self)
        d.pop("label")
        return tuple(sorted(d.items()))


def kept_per_tensor(numels: list[int], density: float) -> list[int]:
    """Entries MicroAdam keeps per step in each tensor (its own Top-K block layout)."""
    from microadam.compress.topk import topk_layout
    from microadam.optim.micro_adam import DEFAULT_TOPK_BLOCK_SIZE

    return [topk_layout(n, DEFAULT_TOPK_BLOCK_SIZE, density).k for n in numels]


def instability(losses: list[float]) -> dict[str, Any]:
    """How far a loss curve climbs back above its best value so far.

    ``rise`` is the largest ``L_e - min(L_0 .. L_{e-1})`` (nats), at epoch ``rise_epoch``,
    from ``rise_from``; ``ratio`` the largest ``L_e / min(L_0 .. L_{e-1})`` over epochs with
    ``L_e >= SPIKE_FLOOR``, at ``ratio_epoch``; ``spikes`` the number of epochs with
    ``L_e > SPIKE_RATIO * min(L_0 .. L_{e-1})`` and ``L_e >= SPIKE_FLOOR``; ``last_spike``
    the last such epoch.
    """
    best = math.inf
    out: dict[str, Any] = {
        "rise": 0.0, "rise_epoch": None, "rise_from": None, "ratio": 1.0, "ratio_epoch": None,
        "spikes": 0, "last_spike": None,
    }  # fmt: skip
    for e, v in enumerate(losses):
        if not math.isfinite(v):
            break
        if e:
            if v - best > out["rise"]:
                out.update(rise=v - best, rise_epoch=e, rise_from=best)
            ratio = v / best if best > 0 else math.inf
            if v >= SPIKE_FLOOR and ratio > out["ratio"]:
                out.update(ratio=ratio, ratio_epoch=e)
            if v >= SPIKE_FLOOR and v > SPIKE_RATIO * best:
                out["spikes"] += 1
                out["last_spike"] = e
        best = min(best, v)
    return out


def train_classifier(
    setup: Setup, variant: Variant, seed: int, epochs: int, batch_size: int = 16,
    data: TabularData | None = None, on_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``setup``'s model with ``variant`` for ``epochs``; return the run record.

    ``on_epoch(steps)`` is called after every epoch with the steps it took (progress).
    """
    data = data or setup.data()
    torch.manual_seed(seed)
    model = mlp([data.num_features, *setup.hidden, data.num_classes])
    params = list(model.parameters())
    opt = variant.build(params)
    gen = torch.Generator().manual_seed(seed)
    x, y, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    n = len(y)

    @torch.no_grad()
    def evaluate() -> tuple[float, float, float]:
        train = F.cross_entropy(model(x), y).item()
        logits = model(xv)
        return (
            train,
            F.cross_entropy(logits, yv).item(),
            (logits.argmax(1) == yv).float().mean().item(),
        )

    train_curve, val_curve, acc_curve = [], [], []
    for curve, v in zip((train_curve, val_curve, acc_curve), evaluate(), strict=True):
        curve.append(v)
    status, message, steps = "ok", None, 0
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            try:
                opt.step()
            except NonFiniteGradientError as err:  # MicroAdam refuses non-finite gradients
                status, message = "diverged", f"epoch {epoch}, step {steps + 1}: {err}"
                break
            steps += 1
        if on_epoch is not None:
            on_epoch(math.ceil(n / batch_size))
        if status != "ok":
            break
        for curve, v in zip((train_curve, val_curve, acc_curve), evaluate(), strict=True):
            curve.append(v)
        if not math.isfinite(train_curve[-1]):
            status, message = "diverged", f"epoch {epoch}: training loss {train_curve[-1]}"
            break
    numels = [p.numel() for p in params]
    kept = kept_per_tensor(numels, variant.density) if variant.optimizer == "microadam" else numels
    finite_train = [v for v in train_curve if math.isfinite(v)]
    return {
        "setup": setup.label,
        "variant": variant.label,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(variant).items()},
        "seed": seed,
        "epochs": epochs,
        "steps": steps,
        "status": status,
        "message": message,
        "train_loss": train_curve,
        "val_loss": val_curve,
        "val_accuracy": acc_curve,
        "final_train": train_curve[-1] if status == "ok" else None,
        "final_val_accuracy": acc_curve[-1] if status == "ok" else None,
        "best_train": min(finite_train) if finite_train else None,
        **instability(train_curve),
        "num_params": sum(numels),
        "kept_per_tensor": kept,
        "effective_density": sum(kept) / sum(numels),
        "state_bytes_per_param": state_bytes(opt) / sum(numels),
        "wall_s": time.perf_counter() - t0,
    }
