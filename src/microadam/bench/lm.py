"""The ``lm`` workload: a byte-level GPT trained on Python's own source code (or any text).

The default model (:data:`LM_DEFAULT`) has 3.36M parameters: 4 pre-norm blocks of width
256 and 4 heads, context 256, vocabulary the 256 byte values. The text is a deterministic
1 MB sample of the standard library's source (:func:`microadam.bench.data.stdlib_text`)
or any file (``text_path``); its last 10% is the validation split. Both splits are scored
in bits per byte (cross-entropy / ln 2) on fixed, evenly spaced windows.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from microadam.bench.data import ByteCorpus, read_text_file, stdlib_text
from microadam.bench.models import TinyGPT
from microadam.bench.workloads import Task, Workload

__all__ = ["LM_DEFAULT", "LM_QUICK", "LMConfig", "LMWorkload"]


@dataclass(frozen=True)
class LMConfig:
    """Model, data and evaluation settings of the language-model workload."""

    context: int = 256
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    batch_size: int = 16
    corpus_bytes: int = 1_000_000
    val_fraction: float = 0.1
    eval_batches: int = 4
    text_path: str | None = None


LM_DEFAULT = LMConfig()
# The README's quick bench: 0.28M parameters and a short context, so that three optimizers
# with a two-point lr grid train for 400 steps in about a minute and a half on two CPU cores.
LM_QUICK = LMConfig(
    context=64, d_model=96, n_layer=2, n_head=4, batch_size=16, corpus_bytes=400_000,
    eval_batches=4,
)  # fmt: skip


class LMWorkload(Workload):
    """Train :class:`TinyGPT` on bytes of text; metric: bits per byte."""

    name = "lm"
    kind = "lm"
    metric = "bpb"
    metric_label = "bits per byte"
    evaluations = 10

    def __init__(self, config: LMConfig | None = None, **overrides: Any):
        cfg = replace(config or LM_DEFAULT, **overrides)
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"Invalid n_head: {cfg.n_head} (must divide d_model={cfg.d_model})")
        self.cfg = cfg
        if cfg.text_path is not None:
            self.text, self.source = read_text_file(cfg.text_path)
        else:
            self.text = stdlib_text(cfg.corpus_bytes, seed=0)
            self.source = (
                f"a deterministic {len(self.text):,}-byte sample of the Python standard "
                f"library's source code"
            )
        ByteCorpus(self.text, cfg.context, cfg.val_fraction)  # check the length early
        cut = int(len(self.text) * (1 - cfg.val_fraction))
        self.validation = (
            f"the last {cfg.val_fraction:.0%} of the text ({len(self.text) - cut:,} bytes); "
            f"both splits scored on {cfg.eval_batches} x {cfg.batch_size} fixed windows"
        )

    def config(self) -> dict[str, Any]:
        out = asdict(self.cfg)
        out["text"] = self.source
        out["text_sha256"] = hashlib.sha256(self.text).hexdigest()[:16]
        return out

    def num_params(self) -> int:
        c = self.cfg
        return sum(
            p.numel() for p in TinyGPT(c.context, c.d_model, c.n_layer, c.n_head).parameters()
        )

    def skip_reason(
        self,
        name: str,
        needs_closure: bool,
        num_params: int,
        hyperparameters: dict[str, Any] | None = None,
    ) -> str | None:
        if needs_closure:
            return (
                "needs a closure over a fixed objective; the language model trains on "
                "random mini-batches (a full-batch closure over the corpus is out of reach "
                f"on a CPU, and {name}'s line search on one batch would change the method)"
            )
        return super().skip_reason(name, needs_closure, num_params, hyperparameters)

    def make_task(self, seed: int, device: str = "cpu") -> Task:
        c = self.cfg
        corpus = ByteCorpus(self.text, c.context, c.val_fraction, seed=seed)
        torch.manual_seed(seed)
        model = TinyGPT(c.context, c.d_model, c.n_layer, c.n_head).to(device)

        def batch_loss() -> torch.Tensor:
            x, y = corpus.train_batch(c.batch_size)
            return model(x.to(device), y.to(device))[1]

        @torch.no_grad()
        def evaluate() -> dict[str, float]:
            model.eval()
            out = {}
            for split in ("train", "val"):
                losses = [
                    model(x.to(device), y.to(device))[1].item()
                    for x, y in corpus.eval_batches(split, c.batch_size, c.eval_batches)
                ]
                out[split] = statistics.fmean(losses) / math.log(2)
            model.train()
            return out

        return Task(model, batch_loss, None, evaluate, metric_scale=1 / math.log(2))
