"""Train the byte-level language model with any registry optimizer and measure it."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from microadam.bench.data import ByteCorpus, stdlib_text
from microadam.bench.models import TinyGPT
from microadam.memory import state_bytes
from microadam.optim.registry import create_optimizer

__all__ = ["LMConfig", "LMResult", "train_lm"]


@dataclass(frozen=True)
class LMConfig:
    """Model and training settings of one language-model run."""

    steps: int = 200
    batch_size: int = 16
    context: int = 128
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    corpus_bytes: int = 1_000_000
    val_batches: int = 8
    eval_every: int = 50
    seed: int = 0
    device: str = "cpu"


@dataclass
class LMResult:
    """What one run measured (losses in bits per byte)."""

    optimizer: str
    hyperparameters: dict[str, Any]
    num_params: int
    state_bytes: int
    state_bytes_per_param: float
    train_bpb: list[float] = field(default_factory=list)
    val_bpb: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    wall_time: float = 0.0

    @property
    def final_train_bpb(self) -> float:
        tail = self.train_bpb[-max(1, len(self.train_bpb) // 10) :]
        return statistics.fmean(tail)

    @property
    def final_val_bpb(self) -> float:
        return self.val_bpb[-1][1]

    @property
    def median_step_ms(self) -> float:
        return 1000 * statistics.median(self.step_times)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hyperparameters"] = {
            k: str(v) if isinstance(v, torch.dtype) else v for k, v in self.hyperparameters.items()
        }
        out.update(
            final_train_bpb=self.final_train_bpb,
            final_val_bpb=self.final_val_bpb,
            median_step_ms=self.median_step_ms,
        )
        return out


@torch.no_grad()
def _evaluate(model: TinyGPT, corpus: ByteCorpus, cfg: LMConfig) -> float:
    model.eval()
    losses = [
        model(x.to(cfg.device), y.to(cfg.device))[1].item()
        for x, y in corpus.val_batches(cfg.batch_size, cfg.val_batches)
    ]
    model.train()
    return statistics.fmean(losses) / math.log(2)


def train_lm(
    optimizer: str,
    hyperparameters: dict[str, Any] | None = None,
    cfg: LMConfig | None = None,
    text: bytes | None = None,
) -> LMResult:
    """Train a fresh :class:`TinyGPT` on ``text`` (default: the stdlib sample) and measure.

    The model initialization and the batches depend only on ``cfg.seed``, so optimizers
    compared with the same config see the same model and the same data.
    """
    cfg = cfg or LMConfig()
    hyperparameters = dict(hyperparameters or {})
    data = text if text is not None else stdlib_text(cfg.corpus_bytes, seed=0)
    corpus = ByteCorpus(data, cfg.context, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.context, cfg.d_model, cfg.n_layer, cfg.n_head).to(cfg.device)
    opt = create_optimizer(optimizer, model, **hyperparameters)
    result = LMResult(
        optimizer=optimizer,
        hyperparameters=hyperparameters,
        num_params=sum(p.numel() for p in model.parameters()),
        state_bytes=0,
        state_bytes_per_param=0.0,
    )
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = corpus.train_batch(cfg.batch_size)
        _, loss = model(x.to(cfg.device), y.to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        result.step_times.append(time.perf_counter() - t0)
        result.train_bpb.append(loss.item() / math.log(2))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            result.val_bpb.append((step, _evaluate(model, corpus, cfg)))
    result.wall_time = time.perf_counter() - start
    result.state_bytes = state_bytes(opt)
    result.state_bytes_per_param = result.state_bytes / result.num_params
    return result
