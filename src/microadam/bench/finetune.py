"""The ``finetune`` workload: fine-tune a pretrained byte-level GPT on new text.

MicroAdam's paper claims AdamW's quality when *fine-tuning* pretrained models (GLUE with
BERT and OPT, GSM-8k with Llama-2-7B), the setting its users are in; from scratch, at 1%
density, it trails. This workload measures that claim offline:

1. **Pretrain once.** :class:`~microadam.bench.models.TinyGPT` trains with AdamW on a
   deterministic sample of the Python standard library's source code
   (:func:`~microadam.bench.data.stdlib_text`), with linear warm-up and decay. The weights
   are cached on disk (:func:`pretrained_weights`), keyed by every setting that shapes
   them, so later runs and every optimizer start from the same checkpoint.
2. **Fine-tune** each optimizer from that checkpoint on other text that ships with Python:
   by default the English help text of ``pydoc_data.topics`` (the pages ``help()`` shows),
   or any file (``text_path``), with linear warm-up over the first 10% of the steps and
   linear decay to zero, as fine-tuning recipes do.

Metrics: bits per byte on the new text's validation split (the target, which picks the
lr), and on the pretraining corpus's validation split after fine-tuning (``pretrain_val``:
how much of the pretraining the optimizer forgot).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from microadam.bench.data import ByteCorpus, read_text_file, stdlib_text
from microadam.bench.lm import LM_QUICK, LMConfig
from microadam.bench.models import TinyGPT
from microadam.bench.progress import Progress
from microadam.bench.workloads import Task, Workload

__all__ = [
    "FINETUNE_DEFAULT",
    "FINETUNE_QUICK",
    "FinetuneConfig",
    "FinetuneWorkload",
    "cache_dir",
    "cached_weights",
    "fine_tuning_schedule",
    "pretrained_weights",
    "pydoc_topics_text",
    "save_atomic",
    "warmup_linear_decay",
]

CACHE_ENV = "MICROADAM_CACHE"


@dataclass(frozen=True)
class FinetuneConfig:
    """The model (as in the ``lm`` workload), its pretraining, and the fine-tuning text."""

    model: LMConfig = LM_QUICK
    pretrain_steps: int = 8000
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 200
    text_path: str | None = None  # the fine-tuning text; default pydoc_data.topics
    val_fraction: float = 0.1
    warmup_fraction: float = 0.1  # of the fine-tuning steps


# The full run: the quick bench's 0.28M-parameter model, pretrained for 8000 steps.
FINETUNE_DEFAULT = FinetuneConfig()
# `make demo`: the same model pretrained for 2000 steps (about 40 s on 2 cores, once).
FINETUNE_QUICK = FinetuneConfig(pretrain_steps=2000)


def pydoc_topics_text() -> bytes:
    """The help topics that ship with Python (``pydoc_data.topics``), as UTF-8 bytes in the
    order of their names: about 0.47 MB of English prose with code examples."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode()


def warmup_linear_decay(step: int, total: int, warmup: int) -> float:
    """The lr multiplier of step ``step`` (0-based) of ``total``: linear from ``1 / warmup``
    to 1 over the first ``warmup`` steps, then linear down to 0 after the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def fine_tuning_schedule(warmup_fraction: float) -> Callable[[int, int], float]:
    """``Task.lr_scale`` of a fine-tuning run: warm-up over ``warmup_fraction`` of the
    steps (at least one), then linear decay to 0."""

    def lr_scale(step: int, total: int) -> float:
        return warmup_linear_decay(step, total, max(1, round(warmup_fraction * total)))

    return lr_scale


def cache_dir() -> Path:
    """Where pretrained weights are kept: ``$MICROADAM_CACHE``, else
    ``$XDG_CACHE_HOME/microadam``, else ``~/.cache/microadam``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "microadam"


def _pretrain_key(cfg: FinetuneConfig, corpus: bytes) -> dict[str, Any]:
    m = cfg.model
    return {
        "model": {k: getattr(m, k) for k in ("context", "d_model", "n_layer", "n_head")},
        "batch_size": m.batch_size,
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
        "val_fraction": m.val_fraction,
        "steps": cfg.pretrain_steps,
        "lr": cfg.pretrain_lr,
        "warmup": cfg.pretrain_warmup,
        "optimizer": "torch.optim.AdamW(weight_decay=0.01)",
        "seed": 0,
        "torch": torch.__version__.split("+")[0],
    }


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through a temporary file beside it and a rename, so
    that a concurrent reader sees no file or the whole file, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cached_weights(
    stem: str, key: dict[str, Any], train: Callable[[Path], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Pretrained weights kept in ``cache_dir()/pretrained/STEM-DIGEST.pt``, where DIGEST
    hashes ``key`` (every setting that shapes the weights; JSON-ready): loaded when the file
    holds that ``key``, else made by ``train(path)`` and stored atomically. Returns
    ``(state_dict, path, trained_now)``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "pretrained" / f"{stem}-{digest}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved["weights"], path, False
    weights = {k: v.detach().clone() for k, v in train(path).items()}
    save_atomic({"key": key, "weights": weights}, path)
    return weights, path, True


def pretrained_weights(
    cfg: FinetuneConfig, corpus: bytes, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """TinyGPT weights after ``cfg.pretrain_steps`` AdamW steps on ``corpus``: from the
    cache when a run with the same settings made them, else trained now (with a progress
    line) and stored. Returns ``(state_dict, path, trained_now)``."""

    def train(path: Path) -> dict[str, torch.Tensor]:
        m = cfg.model
        corpus_split = ByteCorpus(corpus, m.context, m.val_fraction, seed=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = TinyGPT(m.context, m.d_model, m.n_layer, m.n_head)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_linear_decay(s, cfg.pretrain_steps, cfg.pretrain_warmup)
        )
        desc = f"pretraining with AdamW (cached afterwards in {path.parent})"
        with Progress(cfg.pretrain_steps, desc, enabled=show_progress) as progress:
            for _ in range(cfg.pretrain_steps):
                x, y = corpus_split.train_batch(m.batch_size)
                loss = model(x, y)[1]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                progress.update()
        return model.state_dict()

    return cached_weights("tinygpt", _pretrain_key(cfg, corpus), train)


def _bits_per_byte(model, corpus: ByteCorpus, split: str, batch: int, batches: int, device):
    losses = [
        model(x.to(device), y.to(device))[1].item()
        for x, y in corpus.eval_batches(split, batch, batches)
    ]
    return statistics.fmean(losses) / math.log(2)


class FinetuneWorkload(Workload):
    """Fine-tune a pretrained :class:`TinyGPT` on new text; metric: bits per byte."""

    name = "finetune"
    kind = "finetune"
    metric = "bpb"
    metric_label = "bits per byte"
    evaluations = 10

    def __init__(
        self, config: FinetuneConfig | None = None, show_progress: bool = True, **overrides
    ):
        model_keys = {"context", "d_model", "n_layer", "n_head", "batch_size", "corpus_bytes"}
        base = config or FINETUNE_DEFAULT
        model = replace(base.model, **{k: v for k, v in overrides.items() if k in model_keys})
        cfg = replace(
            base, model=model, **{k: v for k, v in overrides.items() if k not in model_keys}
        )
        if cfg.model.d_model % cfg.model.n_head:
            raise ValueError(
                f"Invalid n_head: {cfg.model.n_head} (must divide d_model={cfg.model.d_model})"
            )
        if isinstance(cfg.pretrain_steps, bool) or cfg.pretrain_steps < 1:
            raise ValueError(f"Invalid pretrain_steps: {cfg.pretrain_steps} (expected >= 1)")
        self.cfg = cfg
        self.show_progress = show_progress
        self.pretrain_text = stdlib_text(cfg.model.corpus_bytes, seed=0)
        if cfg.text_path is not None:
            self.text, self.source = read_text_file(cfg.text_path)
        else:
            self.text = pydoc_topics_text()
            self.source = (
                f"the help topics of pydoc_data.topics ({len(self.text):,} bytes of English "
                "prose and examples)"
            )
        context = cfg.model.context
        ByteCorpus(self.text, context, cfg.val_fraction)  # check the lengths early
        ByteCorpus(self.pretrain_text, context, cfg.model.val_fraction)
        m = cfg.model
        self.validation = (
            f"the last {cfg.val_fraction:.0%} of the fine-tuning text; forgetting: the last "
            f"{m.val_fraction:.0%} of the pretraining text; each scored on "
            f"{m.eval_batches} x {m.batch_size} fixed windows"
        )
        self._weights: dict[str, torch.Tensor] | None = None
        self.pretrained_path: Path | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        """The pretrained weights (cached on disk; pretrained on first use)."""
        if self._weights is None:
            self._weights, self.pretrained_path, _ = pretrained_weights(
                self.cfg, self.pretrain_text, self.show_progress
            )
        return self._weights

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["text"] = self.source
        out["text_sha256"] = hashlib.sha256(self.text).hexdigest()[:16]
        out["pretrain_text"] = (
            f"a deterministic {len(self.pretrain_text):,}-byte sample of the Python standard "
            "library's source code"
        )
        out["pretrain_text_sha256"] = hashlib.sha256(self.pretrain_text).hexdigest()[:16]
        out["schedule"] = (
            f"linear warm-up over the first {self.cfg.warmup_fraction:.0%} of the steps, "
            "then linear decay to 0"
        )
        return out

    def num_params(self) -> int:
        m = self.cfg.model
        return sum(
            p.numel() for p in TinyGPT(m.context, m.d_model, m.n_layer, m.n_head).parameters()
        )

    def skip_reason(self, name, needs_closure, num_params, hyperparameters=None):
        if needs_closure:
            return (
                "needs a closure over a fixed objective; fine-tuning trains on random "
                f"mini-batches (and {name}'s line search on one batch would change the method)"
            )
        return super().skip_reason(name, needs_closure, num_params, hyperparameters)

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        m, cfg = self.cfg.model, self.cfg
        target = ByteCorpus(self.text, m.context, cfg.val_fraction, seed=seed)
        source = ByteCorpus(self.pretrain_text, m.context, m.val_fraction, seed=seed)
        torch.manual_seed(seed)
        model = TinyGPT(m.context, m.d_model, m.n_layer, m.n_head)
        model.load_state_dict(self.weights())
        model.to(device)

        def batch_loss() -> torch.Tensor:
            x, y = target.train_batch(m.batch_size)
            return model(x.to(device), y.to(device))[1]

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            model.eval()
            out = {
                split: _bits_per_byte(model, target, split, m.batch_size, m.eval_batches, device)
                for split in ("train", "val")
            }
            out["pretrain_val"] = _bits_per_byte(
                model, source, "val", m.batch_size, m.eval_batches, device
            )
            model.train()
            return out

        return Task(
            model,
            batch_loss,
            None,
            evaluate,
            metric_scale=1 / math.log(2),
            lr_scale=fine_tuning_schedule(cfg.warmup_fraction),
        )
