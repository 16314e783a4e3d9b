"""The compiled step of MicroAdam: the pure step's chunk, traced once by ``torch.compile``.

:func:`micro_adam_multi_step_` walks every parameter in the chunks of the pure step
(:func:`microadam.optim.micro_adam.micro_adam_step_`) and runs each chunk through one
compiled function, :func:`chunk_step`: decode the error feedback, add the gradient, Top-K
per block, quantize what was dropped, rebuild the moments from the window with the new row
in it, update the parameter. Inductor fuses the elementwise work around the Top-K and the
scatters, so a chunk is a handful of kernels instead of the pure step's seventy.

What keeps it compiled once:

- Static shapes (``dynamic=False``): a graph per chunk length and setting. A tensor is cut
  into chunks of the same length as the pure step's, so all full chunks of all tensors
  share one graph and only each tensor's last, shorter chunk can need another. The window
  columns of a chunk are passed as a contiguous copy, so the graph does not depend on the
  tensor's window width.
- Everything that changes from step to step (``t``, the window row, ``lr``, the noise key,
  the chunk's offset) comes in one float64 tensor per chunk (``info``, exact for integers
  below 2^53), built on the host and copied without blocking: no recompiles on a new step
  or a learning-rate schedule, and no host syncs.
- ``recompile_limit`` is raised to :data:`RECOMPILE_LIMIT` while stepping, since a model
  with many distinct tensor sizes needs one graph per last-chunk length.

Exactness: the state it writes (window indices and values, codes, bucket ranges) is bit
for bit the pure step's on tie-free inputs. That needs ``emulate_precision_casts`` (without
it inductor drops the bf16 rounding of a bucket's range before using it, and codes move)
and, on CUDA, IEEE division and no flush of denormals (:data:`COMPILE_OPTIONS`). The
parameters agree up to the rounding of the update: the pure step's ``add_(u, alpha=-lr)``
is a fused multiply-add, which inductor emits on CUDA but not on the CPU (where the compiled
update rounds twice), and scatter-adds may sum in another order on a GPU.

Not covered (the caller falls back to the pure step): tensor subclasses, and block sizes
whose ``lcm(topk_block_size, quant_block_size)`` needs the pure step's two-pass
quantization (above ``MAX_ALIGNED_CHUNK``).

Needs torch >= :data:`MIN_TORCH`: with an older torch :func:`unavailable_reason` says so,
``fused="compiled"`` raises and ``fused=None`` never picks it. Torch 2.6 to 2.10 lack the
``eager_numerics`` options; under 2.11 and 2.12 (and under 2.6 given only the options it
has) the compiled step's error-feedback codes differ from the pure step's on the CPU at the
first or second step (``tests/kernels/test_compiled.py``); 2.13 is the first that matches.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from collections.abc import Sequence

import torch
from torch.utils._triton import has_triton

from microadam.compress.quant import code_levels, mix32, noise_key
from microadam.compress.topk import topk_layout
from microadam.compress.window import saturating_cast

__all__ = [
    "COMPILE_OPTIONS",
    "MIN_TORCH",
    "RECOMPILE_LIMIT",
    "chunk_step",
    "micro_adam_multi_step_",
    "unavailable_reason",
    "unsupported_reason",
]

COMPILE_OPTIONS = {
    "emulate_precision_casts": True,
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
}
MIN_TORCH = (2, 13)
RECOMPILE_LIMIT = 64

# Columns of ``info``, one row per chunk.
_T, _ROW, _KEY, _LR, _START = range(5)

_compiled = None


def _compiled_chunk_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(
            chunk_step, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS
        )
    return _compiled


def _torch_release() -> tuple[int, int]:
    """(major, minor) of this torch; a nightly counts as its release."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def unavailable_reason() -> str | None:
    """None where ``torch.compile`` works in this Python and torch is at least
    :data:`MIN_TORCH` (older inductors compile the step differently), else why not."""
    if _torch_release() < MIN_TORCH:
        return (
            f"the compiled step needs torch >= {'.'.join(map(str, MIN_TORCH))} (older "
            f"inductors do not match the pure step), not {torch.__version__}"
        )
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]}"
    return None


def unsupported_reason(param: torch.Tensor, grad: torch.Tensor, group: dict) -> str | None:
    """Why the compiled step does not cover this parameter under ``group``, or None."""
    from microadam.optim import micro_adam as pure

    if param.device.type == "cuda" and not has_triton():
        return "CUDA parameters without Triton, which inductor compiles to (pip install triton)"
    if type(param.data) is not torch.Tensor:
        return f"parameters of type {type(param.data).__name__}"
    if grad.layout != torch.strided or grad.device != param.device:
        return "gradients that are not dense tensors on the parameter's device"
    if group["error_feedback"]:
        unit = math.lcm(group["topk_block_size"], group["quant_block_size"], 2)
        chunk = pure.chunk_length(param.device)
        if unit > max(pure.MAX_ALIGNED_CHUNK, chunk):
            return (
                f"topk_block_size {group['topk_block_size']} with quant_block_size "
                f"{group['quant_block_size']} (lcm above {max(pure.MAX_ALIGNED_CHUNK, chunk)} "
                "elements needs the pure step's two-pass quantization)"
            )
    return None


def _uniform_noise(key: torch.Tensor, start: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """:func:`microadam.compress.quant.uniform_noise` with the key and offset as tensors."""
    i = start + torch.arange(n, device=key.device, dtype=torch.int64)
    h = mix32((i & 0xFFFFFFFF) ^ key)
    h = mix32(h ^ (i >> 32))
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


def _by_bucket(x: torch.Tensor, q: int) -> list[torch.Tensor]:
    full, tail = divmod(x.numel(), q)
    parts = [x[: full * q].view(full, q)] if full else []
    if tail:
        parts.append(x[full * q :].view(1, tail))
    return parts


def _decode(codes, lo, hi, n: int, q: int, bits: int, dtype) -> torch.Tensor:
    if bits == 4:
        raw = torch.stack([codes >> 4, codes & 0x0F], dim=1).view(-1)[:n]
    else:
        raw = codes
    lo_x = lo.to(dtype)
    step_x = (hi.to(dtype) - lo_x) / code_levels(bits)
    out, b = [], 0
    for part in _by_bucket(raw, q):
        nb = part.shape[0]
        out.append((part.to(dtype) * step_x[b : b + nb, None] + lo_x[b : b + nb, None]).view(-1))
        b += nb
    return torch.cat(out)


def _quantize(a, noise, q: int, bits: int):
    lo_parts, hi_parts = [], []
    for part in _by_bucket(a, q):
        lo_parts.append(part.amin(dim=1))
        hi_parts.append(part.amax(dim=1))
    lo = torch.cat(lo_parts).to(torch.bfloat16)
    hi = torch.cat(hi_parts).to(torch.bfloat16)
    lo_x = lo.to(a.dtype)
    step_x = (hi.to(a.dtype) - lo_x) / code_levels(bits)
    codes, b = [], 0
    noise_parts = _by_bucket(noise, q) if noise is not None else None
    for i, part in enumerate(_by_bucket(a, q)):
        nb = part.shape[0]
        lo_b, step_b = lo_x[b : b + nb, None], step_x[b : b + nb, None]
        scaled = (part - lo_b) / step_b + (0.5 if noise_parts is None else noise_parts[i])
        c = torch.where(step_b > 0, scaled.clamp(0, code_levels(bits)), 0.0)
        codes.append(c.to(torch.uint8).view(-1))
        b += nb
    flat = torch.cat(codes)
    if bits == 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.view(-1, 2)
        flat = (pairs[:, 0] << 4) | pairs[:, 1]
    return flat, lo, hi


def _segments(block: int, num_full: int, k_block: int, tail: int, k_tail: int):
    """``(first element, rows, row length, kept per row)`` of the chunk's full Top-K blocks
    and of its short last block, where there are any."""
    segments = []
    if num_full:
        segments.append((0, num_full, block, k_block))
    if tail:
        segments.append((num_full * block, 1, tail, k_tail))
    return segments


def chunk_step(
    grad: torch.Tensor,
    param: torch.Tensor,
    codes: torch.Tensor | None,
    ef_min: torch.Tensor | None,
    ef_max: torch.Tensor | None,
    window_indices: list[torch.Tensor],
    window_values: list[torch.Tensor],
    info: torch.Tensor,
    *,
    block: int,
    num_full: int,
    k_block: int,
    tail: int,
    k_tail: int,
    quant_block_size: int,
    quant_bits: int,
    stochastic: bool,
    maximize: bool,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    window_size: int,
) -> list[torch.Tensor]:
    """One chunk of the pure step (same numbering, same rounding), for ``torch.compile``.

    ``grad`` and ``param`` are the chunk's flat elements, ``codes``/``ef_min``/``ef_max``
    its packed codes and bucket ranges (all None without error feedback), updated in place
    like ``param``. The chunk is one or two segments (its full Top-K blocks, its short last
    block); ``window_indices``/``window_values`` hold, per segment, a contiguous copy of
    its window columns, all ``m`` rows (unwritten rows are zeros and add nothing). ``info``
    is the chunk's row of per-step numbers (t, row, noise key, lr, offset). Returns the new
    window row of each segment, indices then values, for the caller to store.

    Segments are kept apart rather than concatenated: a coordinate's moments only ever
    come from its own segment's columns, so nothing changes, and inductor (torch 2.13, CPU)
    dropped the writes of the second half of a ``cat`` of Top-K indices.
    """
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    device = param.device
    n = num_full * block + tail
    t, row, lr = info[_T], info[_ROW].to(torch.int64), info[_LR]
    segments = _segments(block, num_full, k_block, tail, k_tail)

    # Alg. 1 line 4: a = g + Q^-1(e).
    a = grad.to(dtype)
    if maximize:
        a = -a
    if codes is not None:
        a = a + _decode(codes, ef_min, ef_max, n, quant_block_size, quant_bits, dtype)
    # Lines 5-6: Top-K per block: the new window row, segment by segment, and the chunk
    # position of every window column of the segment.
    new_rows, positions = [], []
    for first, rows, length, k in segments:
        blocks = a[first : first + rows * length].view(rows, length)
        if k == length:  # density 1
            idx = torch.arange(k, device=device).expand(rows, k)
        else:
            idx = blocks.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        new_rows.append((idx.to(torch.int16), blocks.gather(1, idx)))
        starts = first + torch.arange(rows, device=device) * length
        positions.append(starts.repeat_interleave(k))
    # Lines 7-8: the error is what Top-K dropped, quantized per bucket.
    if codes is not None:
        for (idx, _), offset in zip(new_rows, positions, strict=True):
            a = a.index_fill(0, idx.reshape(-1).to(torch.int64) + offset, 0.0)
        noise = None
        if stochastic:
            key, start = info[_KEY].to(torch.int64), info[_START].to(torch.int64)
            noise = _uniform_noise(key, start, n, dtype)
        packed, lo, hi = _quantize(a, noise, quant_block_size, quant_bits)
        codes.copy_(packed)
        ef_min.copy_(lo)
        ef_max.copy_(hi)
    # Lines 9-11: moments from the window with the new row in place of row (t - 1) mod m.
    rows_ = torch.arange(window_size, device=device)
    is_new = (rows_ == row).unsqueeze(1)
    ages = torch.remainder(t - 1 - rows_.to(torch.float64), window_size)
    decay1 = torch.pow(beta1, ages).to(dtype).unsqueeze(1)
    decay2 = torch.pow(beta2, ages).to(dtype).unsqueeze(1)
    moment1 = torch.zeros(n, dtype=dtype, device=device)
    moment2 = torch.zeros(n, dtype=dtype, device=device)
    entries = []
    out = []
    for (idx, vals), offset, old_idx, old_vals in zip(
        new_rows, positions, window_indices, window_values, strict=True
    ):
        vals = saturating_cast(vals.reshape(-1), old_vals.dtype)
        out += [idx.reshape(-1), vals]
        indices = torch.where(is_new, idx.reshape(1, -1), old_idx)
        values = torch.where(is_new, vals.unsqueeze(0), old_vals).to(dtype)
        pos = (indices.to(torch.int64) + offset).reshape(-1)
        moment1 = moment1.index_add(0, pos, (values * decay1).reshape(-1))
        moment2 = moment2.index_add(0, pos, (values.square() * decay2).reshape(-1))
        entries.append(pos)
    bias1 = ((1.0 - beta1) / (1.0 - torch.pow(beta1, t))).to(dtype)
    bias2 = ((1.0 - beta2) / (1.0 - torch.pow(beta2, t))).to(dtype)
    u = torch.zeros(n, dtype=dtype, device=device)
    for pos in entries:
        m_hat = moment1[pos] * bias1
        v_hat = moment2[pos] * bias2
        denom = v_hat.sqrt() + eps
        u = u.index_put((pos,), torch.where(denom > 0, m_hat / denom, 0.0))
    # Line 12 with decoupled weight decay.
    work = param.to(dtype)
    if weight_decay != 0:
        work = work * (1.0 - lr * weight_decay).to(dtype)
    # addcmul: inductor emits a fused multiply-add for it on CUDA, as eager CUDA and the
    # vectorized CPU loops of ``add_(u, alpha=-lr)`` compute it; on the CPU it rounds
    # twice, a last-bit difference in the parameters only.
    work = torch.addcmul(work, u, -lr.to(dtype))
    param.copy_(work.to(param.dtype))
    return out


def _info_table(rows: list[list[float]], device: torch.device) -> torch.Tensor:
    """The chunks' per-step numbers on ``device``, copied without blocking the host."""
    table = torch.tensor(rows, dtype=torch.float64)
    if device.type == "cpu":
        return table
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def micro_adam_multi_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    window_size: int,
    density: float,
    topk_block_size: int,
    quant_block_size: int,
    quant_bits: int,
    error_feedback: bool,
    rounding: str,
    maximize: bool,
) -> None:
    """One MicroAdam step of several parameters of one param group, chunk by compiled
    chunk. Same contract as :func:`microadam.optim.micro_adam.micro_adam_step_` for each
    parameter (states initialised and checked, gradients checked and only read); the caller
    checks :func:`unsupported_reason` first."""
    from microadam.optim import micro_adam as pure

    for state in states:  # before anything changes
        if int(state["step"].item()) >= pure.MAX_STEPS:
            raise RuntimeError(pure._too_many_steps(int(state["step"].item())))
    rate = float(lr)  # a tensor lr is read once per call (MicroAdam.step passes a float)
    step_fn = _compiled_chunk_step()
    b, q, bits, m = topk_block_size, quant_block_size, quant_bits, window_size
    # One graph per last-chunk length and setting: a model may need more than dynamo's
    # default limit, past which it would run the function uncompiled.
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit):
        for param, grad, state in zip(params, grads, states, strict=True):
            step = int(state["step"].item()) + 1
            d = param.numel()
            layout = topk_layout(d, b, density)
            unit = math.lcm(b, q, 2) if error_feedback else math.lcm(b, 2)
            chunk = unit * max(1, pure.chunk_length(param.device) // unit)
            row = (step - 1) % m
            key = 0
            if rounding == "stochastic":
                key = noise_key(int(state["rng_seed"].item()), step)
            starts = list(range(0, d, chunk))
            info = _info_table([[step, row, key, rate, s] for s in starts], param.device)
            flat_grad = grad.detach().reshape(-1)
            target = param if param.is_contiguous() else param.contiguous()
            flat_param = target.detach().view(-1)
            win_idx, win_val = state["window_indices"], state["window_values"]
            for i, start in enumerate(starts):
                end = min(d, start + chunk)
                j0, j1 = start // b, -(-end // b)
                c0, c1 = layout.columns(j0, j1)
                num_full = min(j1, layout.num_full) - j0
                tail = (end - start) - num_full * b
                ef = {}
                if error_feedback:
                    codes = state["ef_codes"]
                    ef = dict(
                        codes=codes[start // 2 : (end + 1) // 2] if bits == 4 else codes[start:end],
                        ef_min=state["ef_min"][start // q : -(-end // q)],
                        ef_max=state["ef_max"][start // q : -(-end // q)],
                    )
                # Window columns per segment: the full blocks', then the short block's.
                cuts = [c0, c0 + num_full * layout.k_block, c1]
                spans = [(x, y) for x, y in itertools.pairwise(cuts) if y > x]
                new_rows = step_fn(
                    flat_grad[start:end],
                    flat_param[start:end],
                    ef.get("codes"),
                    ef.get("ef_min"),
                    ef.get("ef_max"),
                    [win_idx[:, x:y].contiguous() for x, y in spans],
                    [win_val[:, x:y].contiguous() for x, y in spans],
                    info[i],
                    block=b,
                    num_full=num_full,
                    k_block=layout.k_block,
                    tail=tail,
                    k_tail=layout.k_tail if tail else 0,
                    quant_block_size=q,
                    quant_bits=bits,
                    stochastic=rounding == "stochastic",
                    maximize=maximize,
                    beta1=float(betas[0]),
                    beta2=float(betas[1]),
                    eps=float(eps),
                    weight_decay=float(weight_decay),
                    window_size=m,
                )
                for (x, y), new_idx, new_val in zip(
                    spans, new_rows[::2], new_rows[1::2], strict=True
                ):
                    win_idx[row, x:y] = new_idx
                    win_val[row, x:y] = new_val
            if target is not param:
                param.copy_(target)
            state["step"] += 1
