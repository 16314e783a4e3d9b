"""The bench's workloads: what is trained, on which data, and how it is scored.

Every workload is offline (no download) and builds, for one seed, a :class:`Task`: a model,
a function giving the loss of the next training batch, a full-batch training objective for
closure-based optimizers (L-BFGS, BFGS, Newton), and an evaluation on the whole training
split and on a held-out validation split.

===================  ========  ==========================================================
name                 kind      what
===================  ========  ==========================================================
``rosenbrock``       function  Rosenbrock's valley in 2-D from (-1.2, 1); f(x) is the metric
``quadratic``        function  rotated quadratic, eigenvalues 1/condition .. 1 (``condition``)
``iris``             tabular   4-16-3 MLP, 150 samples, 3 classes
``breast-cancer``    tabular   30-16-2 MLP, 569 samples, 2 classes
``digits``           tabular   64-64-10 MLP, 1797 8x8 images, 10 classes
``lm``               lm        byte-level GPT on Python's own standard library source
``finetune``         finetune  that GPT pretrained with AdamW, fine-tuned on pydoc's help text
``finetune-digits``  finetune  MLP pretrained on digits 0-4; new head, fine-tuned on 5-9
===================  ========  ==========================================================

Tabular data are split 80/20 (stratified, fixed split seed 0) and standardized on the
training part; the metric is cross-entropy in nats, with accuracy beside it. Functions have
no data, so their "train" and "validation" values are both f(x); seed 0 starts at the
classic point and every other seed at that point plus Gaussian noise of scale 0.1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from microadam.bench.functions import ROSENBROCK_START, Quadratic, rosenbrock
from microadam.bench.tabular import (
    TABULAR_DATASETS,
    EpochBatches,
    TabularData,
    load_tabular,
    mlp,
)

__all__ = [
    "WORKLOADS",
    "FunctionWorkload",
    "TabularWorkload",
    "Task",
    "Workload",
    "classifier_task",
    "make_workload",
]


@dataclass
class Task:
    """One workload instantiated for one seed.

    Attributes:
        model: the module whose parameters are optimized.
        batch_loss: loss of the next training batch, with its graph (for ``backward``).
        full_loss: the whole training objective, with its graph, for closure-based
            optimizers; ``None`` where the workload has none.
        evaluate: metrics on the whole splits: ``train``, ``val`` and, for classifiers,
            ``train_accuracy`` and ``val_accuracy``.
        point: the current 2-D position, for trajectory plots; ``None`` otherwise.
        metric_scale: converts the training loss into the workload's metric (``1 / ln 2``
            for bits per byte: the model trains on nats, as usual).
        lr_scale: ``lr_scale(step, total)``, the multiplier of every group's lr at step
            ``step`` (0-based) of ``total`` (a warm-up and decay schedule); ``None`` for a
            constant lr.

    ``evaluate`` may also report ``pretrain_val``: for a fine-tuning workload, the metric
    on the pretraining data's validation split (what fine-tuning forgot).
    """

    model: nn.Module
    batch_loss: Callable[[], torch.Tensor]
    full_loss: Callable[[], torch.Tensor] | None
    evaluate: Callable[[], dict[str, float]]
    point: Callable[[], list[float]] | None = None
    metric_scale: float = 1.0
    lr_scale: Callable[[int, int], float] | None = None


class Workload:
    """Base class: a named, configured problem that builds a :class:`Task` per seed."""

    name: str = ""
    kind: str = ""
    metric: str = ""
    metric_label: str = ""
    validation: str = ""
    log_scale: bool = False  # plot the metric on a log axis
    evaluations: int = 20  # evaluations per run by default (each costs a pass over the data)

    def config(self) -> dict[str, Any]:
        """Every setting of the workload, JSON-ready (recorded in the results file)."""
        raise NotImplementedError

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        raise NotImplementedError

    def num_params(self) -> int:
        torch.manual_seed(0)
        return sum(p.numel() for p in self.make_task(0).model.parameters())

    def skip_reason(
        self,
        name: str,
        needs_closure: bool,
        num_params: int,
        hyperparameters: dict[str, Any] | None = None,
    ) -> str | None:
        """Why optimizer ``name`` (with ``hyperparameters``) cannot run here, or ``None``."""
        hp = hyperparameters or {}
        limit = hp.get("max_hessian_size", 5000)
        if name == "newton" and hp.get("hessian", "exact") == "exact" and num_params > limit:
            return (
                f"Newton's exact Hessian is limited to max_hessian_size={limit} parameters and "
                f"this model has {num_params:,} (--hp newton:hessian=cg runs Newton-CG instead)"
            )
        if name == "bfgs" and num_params > 10_000:
            return (
                f"BFGS keeps a dense inverse Hessian of {num_params:,}^2 floats "
                f"({8 * num_params**2 / 2**30:.1f} GiB at float64)"
            )
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "metric": self.metric,
            "metric_label": self.metric_label,
            "validation": self.validation,
            "log_scale": self.log_scale,
            "num_params": self.num_params(),
            "config": self.config(),
        }


class _Point(nn.Module):
    def __init__(self, start: torch.Tensor):
        super().__init__()
        self.x = nn.Parameter(start.clone())


@dataclass(frozen=True)
class FunctionConfig:
    dim: int = 2
    condition: float = 100.0  # quadratic only


class FunctionWorkload(Workload):
    """Minimize a deterministic function of a few coordinates (float64)."""

    kind = "function"
    metric = "f"
    metric_label = "f(x)"
    validation = "none: the functions have no data, so train and validation are both f(x)"
    log_scale = True

    def __init__(self, name: str, dim: int = 2, condition: float = 100.0):
        if name not in ("rosenbrock", "quadratic"):
            raise ValueError(f"Invalid function: {name!r} (expected rosenbrock or quadratic)")
        self.name = name
        self.cfg = FunctionConfig(dim=dim, condition=condition)
        if name == "rosenbrock":
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
                raise ValueError(f"Invalid dim: {dim} (expected an integer >= 2)")
            self.fn: Callable[[torch.Tensor], torch.Tensor] = rosenbrock
            base = ROSENBROCK_START * (dim // 2) + ROSENBROCK_START[:1] * (dim % 2)
            self.optimum = [1.0] * dim
        else:
            self.fn = Quadratic(dim, condition)
            base = self.fn.start()
            self.optimum = [0.0] * dim
        self.base_start = tuple(base)

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dim": self.cfg.dim, "start": list(self.base_start)}
        if self.name == "quadratic":
            out["condition"] = self.cfg.condition
        out["optimum"] = self.optimum
        return out

    def start(self, seed: int) -> torch.Tensor:
        x = torch.tensor(self.base_start, dtype=torch.float64)
        if seed:
            g = torch.Generator().manual_seed(seed)
            x = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        return x

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        model = _Point(self.start(seed)).to(device)

        def loss() -> torch.Tensor:
            return self.fn(model.x)

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            v = float(self.fn(model.x))
            return {"train": v, "val": v}

        def point() -> list[float]:
            return [float(v) for v in model.x.detach()[:2].cpu()]

        return Task(model, loss, loss, evaluate, point if self.cfg.dim == 2 else None)


@dataclass(frozen=True)
class TabularConfig:
    hidden: tuple[int, ...] = ()
    batch_size: int = 32
    standardize: bool = True
    val_fraction: float = 0.2


TABULAR_HIDDEN = {"iris": (16,), "breast-cancer": (16,), "digits": (64,)}


class TabularWorkload(Workload):
    """A small ReLU MLP classifier on one of scikit-learn's bundled data sets."""

    kind = "tabular"
    metric = "loss"
    metric_label = "cross-entropy (nats)"
    log_scale = True

    def __init__(
        self,
        name: str,
        hidden: tuple[int, ...] | None = None,
        batch_size: int = 32,
        standardize: bool = True,
        val_fraction: float = 0.2,
    ):
        if name not in TABULAR_DATASETS:
            raise ValueError(
                f"Invalid data set: {name!r} (expected one of {', '.join(TABULAR_DATASETS)})"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected an integer >= 1)")
        self.name = name
        hidden = TABULAR_HIDDEN[name] if hidden is None else tuple(hidden)
        self.cfg = TabularConfig(tuple(hidden), batch_size, standardize, val_fraction)
        self.data: TabularData = load_tabular(name, val_fraction, standardize)
        self.sizes = [self.data.num_features, *hidden, self.data.num_classes]
        self.validation = (
            f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split of the "
            f"{len(self.data.y_train) + len(self.data.y_val)} samples (split seed 0); "
            f"{len(self.data.y_val)} held out"
        )

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["hidden"] = list(self.cfg.hidden)
        out["layers"] = self.sizes
        out["train_samples"] = len(self.data.y_train)
        out["val_samples"] = len(self.data.y_val)
        return out

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        torch.manual_seed(seed)
        model = mlp(self.sizes).to(device)
        return classifier_task(model, self.data, self.cfg.batch_size, seed, device)


def classifier_task(
    model: nn.Module,
    data: TabularData,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    extra_metrics: Callable[[], dict[str, float]] | None = None,
    lr_scale: Callable[[int, int], float] | None = None,
) -> Task:
    """A classification :class:`Task` over ``data``: shuffled mini-batches (a fresh
    permutation per epoch, seeded by ``seed``), the full-batch loss for closure-based
    methods, and cross-entropy and accuracy on both splits (plus ``extra_metrics()``)."""
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_va, y_va = data.x_val.to(device), data.y_val.to(device)
    batches = EpochBatches(len(y_tr), batch_size, torch.Generator().manual_seed(seed))

    def batch_loss() -> torch.Tensor:
        idx = batches.next().to(device)
        return F.cross_entropy(model(x_tr[idx]), y_tr[idx])

    def full_loss() -> torch.Tensor:
        return F.cross_entropy(model(x_tr), y_tr)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        out = {}
        for split, x, y in (("train", x_tr, y_tr), ("val", x_va, y_va)):
            logits = model(x)
            out[split] = F.cross_entropy(logits, y).item()
            out[f"{split}_accuracy"] = (logits.argmax(1) == y).float().mean().item()
        if extra_metrics is not None:
            out.update(extra_metrics())
        return out

    return Task(model, batch_loss, full_loss, evaluate, lr_scale=lr_scale)


def _lm(**kwargs: Any) -> Workload:
    from microadam.bench.lm import LMWorkload

    return LMWorkload(**kwargs)


def _finetune(**kwargs: Any) -> Workload:
    from microadam.bench.finetune import FinetuneWorkload

    return FinetuneWorkload(**kwargs)


def _finetune_digits(**kwargs: Any) -> Workload:
    from microadam.bench.finetune_digits import DigitsFinetuneWorkload

    return DigitsFinetuneWorkload(**kwargs)


# name -> constructor; keyword options are passed through (see the CLI's workload options).
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "rosenbrock": lambda **kw: FunctionWorkload("rosenbrock", **kw),
    "quadratic": lambda **kw: FunctionWorkload("quadratic", **kw),
    "iris": lambda **kw: TabularWorkload("iris", **kw),
    "breast-cancer": lambda **kw: TabularWorkload("breast-cancer", **kw),
    "digits": lambda **kw: TabularWorkload("digits", **kw),
    "lm": _lm,
    "finetune": _finetune,
    "finetune-digits": _finetune_digits,
}


def make_workload(name: str, **options: Any) -> Workload:
    """Build workload ``name`` with ``options`` (``None`` values mean the default)."""
    if name not in WORKLOADS:
        raise ValueError(f"Invalid workload: {name!r} (expected one of {', '.join(WORKLOADS)})")
    return WORKLOADS[name](**{k: v for k, v in options.items() if v is not None})
