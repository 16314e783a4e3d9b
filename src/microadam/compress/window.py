"""Adam's moments rebuilt from MicroAdam's sliding window of sparse gradients (Alg. 1, l. 9-11).

The window holds the last ``m`` sparse gradients as rows of (block-local index, value)
pairs. With row ``r`` of age ``age_r = (t - 1 - r) mod m`` (0 for the row written at step
``t``), the moments of coordinate ``i`` are

    M_i = sum_r beta1^age_r V_r[i],     S_i = sum_r beta2^age_r V_r[i]^2

over the rows whose indices contain ``i``, and the Adam direction is

    m_hat = (1 - beta1) M / (1 - beta1^t),   v_hat = (1 - beta2) S / (1 - beta2^t),
    u = m_hat / (sqrt(v_hat) + eps),

zero for coordinates that appear in no row.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["decay_weights", "saturating_cast", "window_ages", "window_direction"]


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 CPU tensor (otherwise ``sqrt``).

    torch's CPU ``sqrt`` goes through MKL's vector math on MKL builds, which is off by one
    unit in the last place for about 15% of float32 inputs (and splits even small tensors
    across threads). In float64, ``1 / rsqrt(x)`` (IEEE square root, then two divisions) is
    within two float64 ulps of the true root, and a float32 square root lies at least four
    float64 ulps away from every float32 rounding midpoint, so rounding it to float32 gives
    the correctly rounded root: what IEEE ``sqrtf`` (and the fused kernels) give.
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return x.sqrt()
    return x.double().rsqrt_().reciprocal_().float()


def saturating_cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype`` with what lies beyond its range saturated at its largest
    finite value instead of overflowing to inf.

    The window values are stored in ``value_dtype``: a float16 window cannot hold the 1e5
    that error feedback accumulates from gradients of 1e4 (float16 ends at 65504), and bf16
    ends just below float32's maximum. The excess is dropped, as gradient clipping would;
    values in range are cast exactly as ``Tensor.to`` casts them.
    """
    if values.dtype == dtype:
        return values
    top = torch.finfo(dtype).max
    if top >= torch.finfo(values.dtype).max:
        return values.to(dtype)
    return values.clamp(-top, top).to(dtype)


def window_ages(step: int, window_size: int) -> list[int]:
    """Ages of the rows written so far at step ``step`` (row ``r`` is written at steps
    ``t`` with ``(t - 1) mod m == r``); only the first ``min(step, m)`` rows exist."""
    rows = min(step, window_size)
    return [(step - 1 - r) % window_size for r in range(rows)]


@functools.lru_cache(maxsize=256)
def decay_weights(
    step: int, window_size: int, beta: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``beta ** age_r`` for the rows written so far at step ``step``, as a ``(rows, 1)``
    tensor on ``device`` (computed in double precision, then cast: the kernels do the same).

    The weights depend on the step only through ``(step - 1) mod m`` and ``min(step, m)``,
    so the cache keyed on those holds at most ``2 m`` tensors per setting: after the first
    window a step copies nothing from the host, which on an accelerator would be a blocking
    copy per chunk. The tensors are shared: never write to them.
    """
    weights = [beta**a for a in window_ages(step, window_size)]
    return torch.tensor(weights, dtype=dtype).unsqueeze(1).to(device)


def _decay(step: int, window_size: int, beta: float, dtype, device) -> torch.Tensor:
    # Key the cache on what the weights depend on, not on the step itself.
    wrapped = step if step <= window_size else window_size + (step - 1) % window_size + 1
    return decay_weights(wrapped, window_size, beta, dtype, device)


def window_direction(
    indices: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    length: int,
    step: int,
    window_size: int,
    betas: tuple[float, float],
    eps: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense Adam direction ``u`` (length ``length``, dtype ``dtype``) of one chunk.

    Args:
        indices: ``(rows, c)`` int16 block-local indices of the chunk's window columns for
            the rows written so far (``rows = min(step, window_size)``, rows in storage order).
        values: ``(rows, c)`` the matching values (any floating dtype).
        offsets: ``(c,)`` int64, position of each column's block start inside the chunk.
        length: elements in the chunk.
        step: the step ``t`` (after increment), for the ages and the bias correction.
        window_size: ``m``, the number of rows of the full window.
        betas, eps: as in Adam.
        dtype: compute dtype (float32, or float64 for float64 parameters).
    """
    beta1, beta2 = betas
    device = values.device
    decay1 = _decay(step, window_size, beta1, dtype, device)
    decay2 = _decay(step, window_size, beta2, dtype, device)
    pos = (indices.to(torch.int64) + offsets).reshape(-1)
    vals = values.to(dtype)
    first = (vals * decay1).reshape(-1)
    second = (vals.square() * decay2).reshape(-1)
    moment1 = torch.zeros(length, dtype=dtype, device=device).index_add_(0, pos, first)
    moment2 = torch.zeros(length, dtype=dtype, device=device).index_add_(0, pos, second)
    # u is 0 outside the window, so it is computed at the window's entries only (about 10%
    # of the chunk at the defaults); a coordinate in several rows gets the same value
    # several times, so writing them all back is deterministic.
    m_hat = moment1[pos].mul_((1.0 - beta1) / (1.0 - beta1**step))
    v_hat = moment2[pos].mul_((1.0 - beta2) / (1.0 - beta2**step))
    denom = _sqrt(v_hat).add_(eps)
    # Entries whose squares underflow have denom 0 when eps == 0: their direction is 0 by
    # definition, never 0/0.
    u = torch.where(denom > 0, m_hat.div_(denom), 0.0)
    return torch.zeros(length, dtype=dtype, device=device).index_put_((pos,), u)
