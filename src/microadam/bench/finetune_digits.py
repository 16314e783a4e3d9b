"""The ``finetune-digits`` workload: a pretrained MLP body, a new head, a new task.

The shape of the paper's GLUE experiments (a pretrained BERT or OPT body, a freshly
initialized classification head per task, every parameter fine-tuned) at the size of
scikit-learn's 8x8 digits:

1. **Pretrain once.** A ReLU MLP (64 standardized pixels, hidden sizes 128, 128 by default,
   a 5-way head) trains with AdamW on the images of the digits 0-4, with linear warm-up
   and decay, to about 99% validation accuracy. The weights are cached on disk
   (:func:`pretrained_mlp`, through :func:`~microadam.bench.finetune.cached_weights` as
   the ``finetune`` workload's model is), keyed by every setting that shapes them.
2. **New task, new head.** For fine-tuning the body is kept, the pretraining head is set
   aside (frozen, as buffers of the model: no optimizer ever sees it), and a fresh 5-way
   head, initialized from the run's seed, is attached for the digits 5-9 (labels
   ``digit - 5``). Every optimizer fine-tunes body and new head on mini-batches, with
   linear warm-up over the first 10% of the steps and linear decay to zero.

Why digits: the images ship inside scikit-learn's wheel (no download), a run takes
seconds on a CPU, the pretrain-then-new-head shape is GLUE fine-tuning's, and because the
old head is kept, forgetting is measurable exactly: ``pretrain_val`` is the cross-entropy
of the fine-tuned body read through the original head on the held-out images of 0-4.

Metrics: cross-entropy (nats) on the held-out images of 5-9 (``val``, which picks the lr),
with the accuracies beside it; ``pretrain_val`` as above (higher means more forgotten).
Each class group is split 80/20, stratified, with a fixed split seed, so every optimizer
and seed sees the same images; the pixels are standardized with the mean and standard
deviation of all training images (both groups; no held-out image), the one preprocessing
of both stages.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from microadam.bench.finetune import cached_weights, fine_tuning_schedule, warmup_linear_decay
from microadam.bench.progress import Progress
from microadam.bench.tabular import EpochBatches, TabularData, load_arrays, mlp, standardized
from microadam.bench.workloads import Task, Workload, classifier_task

__all__ = [
    "FINETUNE_CLASSES",
    "PRETRAIN_CLASSES",
    "BodyWithNewHead",
    "DigitGroups",
    "DigitsFinetuneConfig",
    "DigitsFinetuneWorkload",
    "load_digit_groups",
    "pretrained_mlp",
]

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class DigitsFinetuneConfig:
    """The MLP, its pretraining on digits 0-4 and the fine-tuning on 5-9.

    ``hidden`` and ``batch_size`` are shared by both stages (the body is the same network;
    one batch size, as in the ``finetune`` workload).
    """

    hidden: tuple[int, ...] = (128, 128)
    batch_size: int = 32
    pretrain_steps: int = 1000
    pretrain_lr: float = 1e-3
    pretrain_warmup_fraction: float = 0.1  # of the pretraining steps
    val_fraction: float = 0.2  # of each class group
    split_seed: int = 0
    warmup_fraction: float = 0.1  # of the fine-tuning steps


@dataclass(frozen=True)
class DigitGroups:
    """Digits 0-4 (pretraining) and 5-9 (fine-tuning), each split into train and val with
    labels 0..4; ``sha256``: of the raw images and labels scikit-learn ships."""

    pretrain: TabularData
    finetune: TabularData
    sha256: str


def load_digit_groups(
    val_fraction: float = 0.2, split_seed: int = 0, standardize: bool = True
) -> DigitGroups:
    """scikit-learn's digits in two class groups, each split stratified (deterministic:
    ``split_seed`` only), labels remapped to 0..4; with ``standardize``, the pixels centred
    and scaled by the per-pixel mean and standard deviation of every training image."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (expected 0 < val_fraction < 1)")
    x, y = load_arrays("digits")
    from sklearn.model_selection import train_test_split

    sha = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
    parts = []
    for classes in (PRETRAIN_CLASSES, FINETUNE_CLASSES):
        keep = (y >= classes[0]) & (y <= classes[-1])
        labels = y[keep] - classes[0]
        x_tr, x_va, y_tr, y_va = train_test_split(
            x[keep], labels, test_size=val_fraction, random_state=split_seed, stratify=labels
        )
        parts.append([torch.tensor(a, dtype=torch.float64) for a in (x_tr, x_va)])
        parts[-1] += [torch.tensor(a, dtype=torch.int64) for a in (y_tr, y_va)]
    reference = torch.cat([parts[0][0], parts[1][0]])
    groups = []
    for name, (x_tr, x_va, y_tr, y_va) in zip(("digits 0-4", "digits 5-9"), parts, strict=True):
        if standardize:
            x_tr, x_va = standardized(reference, x_tr, x_va)
        groups.append(TabularData(name, x_tr.float(), y_tr, x_va.float(), y_va, standardize))
    return DigitGroups(groups[0], groups[1], sha)


def _layer_sizes(hidden: tuple[int, ...]) -> list[int]:
    return [64, *hidden, len(PRETRAIN_CLASSES)]


def _pretrain_key(cfg: DigitsFinetuneConfig, groups: DigitGroups) -> dict[str, Any]:
    return {
        "layers": _layer_sizes(cfg.hidden),
        "classes": list(PRETRAIN_CLASSES),
        "steps": cfg.pretrain_steps,
        "lr": cfg.pretrain_lr,
        "warmup_fraction": cfg.pretrain_warmup_fraction,
        "batch_size": cfg.batch_size,
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "data_sha256": groups.sha256,
        "standardized": "every training image of both groups",
        "optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "seed": 0,
        "torch": torch.__version__.split("+")[0],
    }


def pretrained_mlp(
    cfg: DigitsFinetuneConfig, groups: DigitGroups, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """The MLP's weights (``mlp([64, *hidden, 5])``'s state dict) after
    ``cfg.pretrain_steps`` AdamW steps on the training images of 0-4: from the cache when a
    run with the same settings made them, else trained now and stored. Returns
    ``(state_dict, path, trained_now)``."""

    def train(path: Path) -> dict[str, torch.Tensor]:
        data = groups.pretrain
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = mlp(_layer_sizes(cfg.hidden))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
        warmup = max(1, round(cfg.pretrain_warmup_fraction * cfg.pretrain_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_linear_decay(s, cfg.pretrain_steps, warmup)
        )
        batches = EpochBatches(len(data.y_train), cfg.batch_size, torch.Generator().manual_seed(0))
        desc = f"pretraining on digits 0-4 with AdamW (cached afterwards in {path.parent})"
        with (
            torch.enable_grad(),
            Progress(cfg.pretrain_steps, desc, enabled=show_progress) as progress,
        ):
            for _ in range(cfg.pretrain_steps):
                idx = batches.next()
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                progress.update()
        return model.state_dict()

    return cached_weights("digits-mlp", _pretrain_key(cfg, groups), train)


class BodyWithNewHead(nn.Module):
    """A pretrained body with a new head (``forward``), and the pretraining head set aside
    as buffers: never a parameter, so never optimized, read by :meth:`old_head_logits`."""

    def __init__(self, body: nn.Module, head: nn.Linear, old_head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head
        self.register_buffer("old_head_weight", old_head.weight.detach().clone())
        self.register_buffer("old_head_bias", old_head.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def old_head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.body(x), self.old_head_weight, self.old_head_bias)


def _scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy."""
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def _positive_ints(value: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)


class DigitsFinetuneWorkload(Workload):
    """Fine-tune an MLP pretrained on digits 0-4, with a new head, on digits 5-9."""

    name = "finetune-digits"
    kind = "finetune"
    metric = "loss"
    metric_label = "cross-entropy (nats)"
    log_scale = True

    def __init__(
        self,
        config: DigitsFinetuneConfig | None = None,
        show_progress: bool = True,
        **overrides: Any,
    ):
        base = config or DigitsFinetuneConfig()
        if "hidden" in overrides:
            overrides["hidden"] = tuple(overrides["hidden"])
        cfg = DigitsFinetuneConfig(**{**asdict(base), **overrides})
        if not cfg.hidden or not _positive_ints(cfg.hidden):
            raise ValueError(
                f"Invalid hidden: {list(cfg.hidden)} (expected one or more positive sizes: "
                "the hidden layers are the pretrained body)"
            )
        for key in ("batch_size", "pretrain_steps"):
            if not _positive_ints([getattr(cfg, key)]):
                raise ValueError(f"Invalid {key}: {getattr(cfg, key)} (expected an integer >= 1)")
        self.cfg = cfg
        self.show_progress = show_progress
        self.groups = load_digit_groups(cfg.val_fraction, cfg.split_seed)
        self.sizes = _layer_sizes(cfg.hidden)
        pre, fine = self.groups.pretrain, self.groups.finetune
        self.validation = (
            f"stratified {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%} split of each class "
            f"group (split seed {cfg.split_seed}): {len(fine.y_val)} held-out images of digits "
            f"5-9; forgetting: {len(pre.y_val)} held-out images of digits 0-4, read through "
            "the frozen pretraining head"
        )
        self._weights: dict[str, torch.Tensor] | None = None
        self._pretrained: dict[str, float] | None = None
        self.pretrained_path: Path | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        """The pretrained MLP's state dict (cached on disk; pretrained on first use)."""
        if self._weights is None:
            self._weights, self.pretrained_path, _ = pretrained_mlp(
                self.cfg, self.groups, self.show_progress
            )
        return self._weights

    def _pretrained_model(self) -> nn.Sequential:
        with torch.random.fork_rng():
            model = mlp(self.sizes)
        model.load_state_dict(self.weights())
        return model

    def pretrained_metrics(self) -> dict[str, float]:
        """The pretrained MLP (body and its own head) on digits 0-4: cross-entropy and
        accuracy on the training and the held-out images."""
        if self._pretrained is None:
            model, d = self._pretrained_model(), self.groups.pretrain
            out = {}
            with torch.no_grad():
                for split, x, y in (("train", d.x_train, d.y_train), ("val", d.x_val, d.y_val)):
                    out[split], out[f"{split}_accuracy"] = _scores(model(x), y)
            self._pretrained = out
        return self._pretrained

    def pretrained_summary(self) -> str:
        m = self.pretrained_metrics()
        return (
            f"pretrained on digits 0-4 ({self.cfg.pretrain_steps} AdamW steps): val accuracy "
            f"{100 * m['val_accuracy']:.2f}%, val cross-entropy {m['val']:.4f}"
        )

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["hidden"] = list(self.cfg.hidden)
        out["layers"] = self.sizes
        out["pretrain_classes"] = list(PRETRAIN_CLASSES)
        out["finetune_classes"] = list(FINETUNE_CLASSES)
        for key, data in (("pretrain", self.groups.pretrain), ("finetune", self.groups.finetune)):
            out[f"{key}_samples"] = {"train": len(data.y_train), "val": len(data.y_val)}
        out["data_sha256"] = self.groups.sha256
        out["pretrained"] = {k: round(v, 6) for k, v in self.pretrained_metrics().items()}
        out["new_head"] = (
            f"nn.Linear({self.cfg.hidden[-1]}, {len(FINETUNE_CLASSES)}) initialized from the "
            "run's seed; the pretraining head is kept frozen for pretrain_val"
        )
        out["schedule"] = (
            f"linear warm-up over the first {self.cfg.warmup_fraction:.0%} of the steps, "
            "then linear decay to 0"
        )
        return out

    def num_params(self) -> int:
        """Body and new head (the frozen pretraining head is not a parameter)."""
        return sum(a * b + b for a, b in itertools.pairwise(self.sizes))

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        cfg, d, pre = self.cfg, self.groups.finetune, self.groups.pretrain
        pretrained = self._pretrained_model()
        torch.manual_seed(seed)
        new_head = nn.Linear(cfg.hidden[-1], len(FINETUNE_CLASSES))
        model = BodyWithNewHead(pretrained[:-1], new_head, pretrained[-1]).to(device)
        x_old, y_old = pre.x_val.to(device), pre.y_val.to(device)

        def forgetting() -> dict[str, float]:
            return {"pretrain_val": F.cross_entropy(model.old_head_logits(x_old), y_old).item()}

        return classifier_task(
            model,
            d,
            cfg.batch_size,
            seed,
            device,
            extra_metrics=forgetting,
            lr_scale=fine_tuning_schedule(cfg.warmup_fraction),
        )
