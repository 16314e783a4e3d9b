"""A slow, obviously-correct MicroAdam, transcribed from the design page (docs: microadam.md).

This is the oracle that ``tests/optim/test_micro_adam_reference.py`` compares the real
``microadam.MicroAdam`` against, step by step. It is written from the design page, not
from the real code, and favours plain data over speed:

- the window of one parameter is a Python list of ``m`` rows; a row is ``None`` until it is
  first written, then a dict ``{global flat index: 0-d tensor of value_dtype}`` holding, for
  each Top-K block in order, the kept indices in ascending order;
- the error feedback is a Python list of ``d`` integer codes (unpacked) plus one bf16
  ``lo`` and one bf16 ``hi`` (0-d tensors) per bucket;
- Top-K sorts ``|a|`` block by block; quantization and dequantization run bucket by bucket
  with the formulas of the design page written out.

Arithmetic happens on torch tensors of the compute dtype (float32, or float64 for float64
parameters) so that it rounds exactly as the design page's formulas say; Python floats
(doubles) are used only where the design page says so (``beta ** age``, the
bias-correction factors, ``1 - lr * weight_decay``).

Conventions the design page leaves open and that this reference shares with the real
implementation:

(a) a window row holds each Top-K block's kept indices in ascending order;
(b) a block of ``n`` elements keeps ``ceil(round(n * density, 9))`` elements, clamped to
    ``[1, n]`` (full blocks ``n = topk_block_size``, a short last block its length, a
    tensor smaller than one block is one block);
(c) stochastic rounding at step ``t`` of a parameter of ``d`` elements uses
    ``xi = uniform_noise(seed, t, 0, d)`` in the compute dtype, with the parameter's seed
    (the real optimizer keeps it as ``state["rng_seed"]``; set ``ReferenceState.rng_seed``).

Only :func:`microadam.compress.quant.uniform_noise` is imported from the library: it
defines the random stream of stochastic rounding, nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from microadam.compress.quant import uniform_noise

__all__ = [
    "HYPERPARAMETERS",
    "ReferenceMicroAdam",
    "ReferenceState",
    "compute_dtype",
    "dequantize_buckets",
    "kept_count",
    "quantize_buckets",
    "reference_step",
    "topk_blocks",
    "topk_cut_ties",
    "topk_layout",
]

HYPERPARAMETERS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "window_size",
    "density",
    "topk_block_size",
    "quant_block_size",
    "quant_bits",
    "error_feedback",
    "rounding",
    "value_dtype",
    "maximize",
)


def compute_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 parameters, float32 for everything else."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def kept_count(n: int, density: float) -> int:
    """Elements a Top-K block of ``n`` elements keeps: ceil(n * density), in [1, n].

    The product is rounded to 9 decimals first, so 100 * 0.07 keeps 7, not 8.
    """
    return max(1, min(n, math.ceil(round(n * density, 9))))


def topk_layout(d: int, block_size: int, density: float) -> list[tuple[int, int, int]]:
    """The Top-K blocks of a flat tensor of ``d`` elements as ``(start, length, kept)``."""
    blocks = []
    for start in range(0, d, block_size):
        n = min(block_size, d - start)
        blocks.append((start, n, kept_count(n, density)))
    return blocks


def topk_blocks(a: torch.Tensor, block_size: int, density: float) -> tuple[list[int], int]:
    """Global indices of the largest ``|a|`` of every block, blocks in order and each
    block's indices ascending; also the number of blocks where the last kept and the
    first dropped magnitude tie (the choice is then arbitrary, so comparisons that need a
    unique answer should check it is 0)."""
    kept: list[int] = []
    ties = 0
    for start, n, k in topk_layout(a.numel(), block_size, density):
        mags = a[start : start + n].abs()
        order = torch.argsort(mags, descending=True, stable=True).tolist()
        if k < n and mags[order[k - 1]] == mags[order[k]]:
            ties += 1
        kept.extend(start + i for i in sorted(order[:k]))
    return kept, ties


def topk_cut_ties(x: torch.Tensor, block_size: int, k_block: int, k_tail: int) -> int:
    """How many Top-K blocks of ``x`` (full blocks keep ``k_block``, the short last one
    ``k_tail``) have a tie between the last kept and the first dropped ``|x|``: there either
    choice of indices is correct, so two implementations may keep different ones."""
    full = x.numel() // block_size
    ties = 0
    for blocks, k in (
        (x[: full * block_size].view(full, block_size), k_block),
        (x[full * block_size :].view(1, -1), k_tail),
    ):
        if blocks.numel() and k < blocks.shape[1]:
            top = blocks.abs().topk(k + 1, dim=1).values
            ties += int((top[:, k - 1] == top[:, k]).sum())
    return ties


def _bucket_step(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype):
    """``(lo, u)`` of a bucket in the compute dtype: u = (hi - lo) / (2^b - 1), from the
    bf16 values cast to the compute dtype."""
    lo_c, hi_c = lo.to(dtype), hi.to(dtype)
    return lo_c, (hi_c - lo_c) / (2**bits - 1)


def dequantize_buckets(
    codes: list[int],
    lo: list[torch.Tensor],
    hi: list[torch.Tensor],
    bucket_size: int,
    bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Q^-1: ``code * u + lo`` bucket by bucket, as one flat tensor of ``dtype``."""
    parts = []
    for b, start in enumerate(range(0, len(codes), bucket_size)):
        lo_c, u = _bucket_step(lo[b], hi[b], bits, dtype)
        c = torch.tensor(codes[start : start + bucket_size], dtype=dtype)
        parts.append(c * u + lo_c)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def quantize_buckets(
    x: torch.Tensor,
    bucket_size: int,
    bits: int,
    noise: torch.Tensor | None = None,
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
    """Q: bucket by bucket, lo = bf16(min x), hi = bf16(max x), u = (hi - lo) / L and
    code = clamp(floor((x - lo) / u + 1/2), 0, L) (``noise`` xi in place of 1/2 for
    stochastic rounding); every code is 0 where u == 0. Returns the codes as Python ints
    and the per-bucket bf16 ``lo`` and ``hi`` (0-d tensors)."""
    levels = 2**bits - 1
    codes: list[int] = []
    los: list[torch.Tensor] = []
    his: list[torch.Tensor] = []
    for start in range(0, x.numel(), bucket_size):
        xb = x[start : start + bucket_size]
        lo = xb.min().to(torch.bfloat16)
        hi = xb.max().to(torch.bfloat16)
        lo_c, u = _bucket_step(lo, hi, bits, x.dtype)
        if u == 0:
            codes.extend([0] * xb.numel())
        else:
            offset = 0.5 if noise is None else noise[start : start + bucket_size]
            c = torch.floor((xb - lo_c) / u + offset).clamp(0, levels)
            codes.extend(int(v) for v in c.tolist())
        los.append(lo)
        his.append(hi)
    return codes, los, his


@dataclass
class ReferenceState:
    """State of one parameter: its step, the window rows and the error feedback."""

    d: int
    window_size: int
    error_feedback: bool
    quant_block_size: int
    step: int = 0
    rows: list[dict[int, torch.Tensor] | None] = field(default_factory=list)
    ef_codes: list[int] = field(default_factory=list)
    ef_lo: list[torch.Tensor] = field(default_factory=list)
    ef_hi: list[torch.Tensor] = field(default_factory=list)
    rng_seed: int | None = None
    ties: int = 0  # Top-K blocks so far whose boundary was a tie (see topk_blocks)

    def __post_init__(self) -> None:
        self.rows = [None] * self.window_size
        if self.error_feedback:
            # e_1 = 0: all codes 0 with lo = hi = 0 decodes to exactly 0.
            buckets = -(-self.d // self.quant_block_size)
            self.ef_codes = [0] * self.d
            zero = torch.zeros((), dtype=torch.bfloat16)
            self.ef_lo = [zero.clone() for _ in range(buckets)]
            self.ef_hi = [zero.clone() for _ in range(buckets)]


def reference_step(param: torch.Tensor, grad: torch.Tensor, state: ReferenceState, h: dict):
    """One MicroAdam step of one parameter (design page, "One step for one parameter").

    ``param`` is updated in place; ``grad`` is only read; ``h`` holds the hyperparameters
    (see :data:`HYPERPARAMETERS`; ``lr`` a Python float).
    """
    dtype = compute_dtype(param.dtype)
    d = param.numel()
    m = h["window_size"]
    beta1, beta2 = h["betas"]
    bits, q = h["quant_bits"], h["quant_block_size"]
    state.step += 1
    t = state.step

    # 1. a = g + Q^-1(e_t) in the compute dtype; with maximize, g is negated first.
    g = grad.reshape(-1).to(dtype)
    if h["maximize"]:
        g = -g
    if h["error_feedback"]:
        a = g + dequantize_buckets(state.ef_codes, state.ef_lo, state.ef_hi, q, bits, dtype)
    else:
        a = g.clone()

    # 2. Top-K of |a| in every block.
    kept, ties = topk_blocks(a, h["topk_block_size"], h["density"])
    state.ties += ties

    # 3. Row (t - 1) mod m of the window: the kept indices and a[I] in value_dtype.
    state.rows[(t - 1) % m] = {i: a[i].to(h["value_dtype"]) for i in kept}

    # 4. Error feedback: what Top-K dropped, quantized bucket by bucket.
    if h["error_feedback"]:
        residual = a.clone()
        residual[kept] = 0
        noise = None
        if h["rounding"] == "stochastic":
            if state.rng_seed is None:
                raise RuntimeError("stochastic rounding needs ReferenceState.rng_seed")
            noise = uniform_noise(state.rng_seed, t, 0, d, dtype=dtype)
        state.ef_codes, state.ef_lo, state.ef_hi = quantize_buckets(residual, q, bits, noise)

    # 5. Moments over the min(t, m) rows written so far, row r of age (t - 1 - r) mod m.
    moment1 = torch.zeros(d, dtype=dtype)
    moment2 = torch.zeros(d, dtype=dtype)
    in_window = torch.zeros(d, dtype=torch.bool)
    for r in range(min(t, m)):
        row = state.rows[r]
        if not row:  # an empty parameter keeps nothing
            continue
        age = (t - 1 - r) % m
        decay1 = torch.tensor(beta1**age, dtype=dtype)  # Python double, then cast
        decay2 = torch.tensor(beta2**age, dtype=dtype)
        idx = torch.tensor(list(row.keys()), dtype=torch.int64)
        vals = torch.stack(list(row.values())).to(dtype)
        dense = torch.zeros(d, dtype=dtype)
        dense[idx] = vals
        moment1 = moment1 + decay1 * dense
        moment2 = moment2 + decay2 * (dense * dense)
        in_window[idx] = True
    m_hat = moment1 * ((1.0 - beta1) / (1.0 - beta1**t))
    v_hat = moment2 * ((1.0 - beta2) / (1.0 - beta2**t))
    u = m_hat / (torch.sqrt(v_hat) + h["eps"])
    u = torch.where(in_window, u, torch.zeros((), dtype=dtype))  # no row: u = 0

    # 6. Decoupled weight decay, then the step, in the compute dtype.
    p = param.reshape(-1).to(dtype)
    p = p * (1.0 - h["lr"] * h["weight_decay"])
    p = p - h["lr"] * u
    param.copy_(p.reshape(param.shape))


class ReferenceMicroAdam:
    """Param groups and per-parameter states around :func:`reference_step`.

    ``groups`` is a list of dicts with ``"params"`` (tensors, updated in place) and every
    key of :data:`HYPERPARAMETERS`. :meth:`step` takes one gradient (or ``None``: skipped,
    its step does not advance) per parameter, in group order.
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = []
        for group in groups:
            missing = [k for k in HYPERPARAMETERS if k not in group]
            if missing:
                raise ValueError(f"reference group lacks {missing}")
            self.groups.append({**group, "params": list(group["params"])})
        self.states: list[ReferenceState | None] = [None] * len(self.params)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def group_of(self, index: int) -> dict[str, Any]:
        for g in self.groups:
            if index < len(g["params"]):
                return g
            index -= len(g["params"])
        raise IndexError(index)

    def state(self, index: int) -> ReferenceState:
        """The state of parameter ``index`` (created on first use)."""
        if self.states[index] is None:
            g = self.group_of(index)
            self.states[index] = ReferenceState(
                d=self.params[index].numel(),
                window_size=g["window_size"],
                error_feedback=g["error_feedback"],
                quant_block_size=g["quant_block_size"],
            )
        return self.states[index]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None]) -> None:
        params = self.params
        if len(grads) != len(params):
            raise ValueError(f"expected {len(params)} gradients, got {len(grads)}")
        for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
            if grad is None:
                continue
            h = dict(self.group_of(i))
            lr = h["lr"]
            h["lr"] = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            reference_step(p, grad, self.state(i), h)
