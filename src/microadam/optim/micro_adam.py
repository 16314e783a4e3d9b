"""MicroAdam: Adam's update from a sliding window of Top-K gradients with 4-bit error feedback.

The class is thin (validation, ``defaults``, lazy state, checkpoint handling); the
mathematics of one step lives in :func:`micro_adam_step_`, which walks a parameter in
chunks of whole Top-K blocks so that scratch memory is bounded by the chunk, never by the
tensor (no float32 temporary of the parameter's size). On the CPU, ``step`` hands the
parameters it covers to the fused kernel of :mod:`microadam.kernels.micro_adam_cpu`
(same inputs, outputs and rounding; ``fused`` chooses), and this function is the readable
reference and the fallback everywhere else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from microadam.compress.quant import (
    code_levels,
    decode,
    dequantize,
    encode,
    expand_buckets,
    pack_nibbles,
    quantize,
    uniform_noise,
    unpack_nibbles,
)
from microadam.compress.topk import MAX_BLOCK_SIZE, TopKLayout, block_topk, topk_layout
from microadam.compress.window import saturating_cast, window_direction
from microadam.optim import _sharding
from microadam.optim._common import (
    NONFINITE_POLICIES,
    LazyText,
    NonFiniteSteps,
    caller_stacklevel,
    check_betas,
    check_choice,
    check_flag,
    check_int,
    check_lr,
    check_nonnegative,
    check_number,
    describe_param,
    lift_format_key,
    load_checked_state_dict,
    params_by_saved_id,
    params_with_grad,
    run_closure,
)
from microadam.optim.micro_adam_state import (
    CPU_KEYS,
    LAYOUT_KEYS,
    expected_state,
    memory_formula,
)

__all__ = [
    "DEFAULT_QUANT_BLOCK_SIZE",
    "DEFAULT_TOPK_BLOCK_SIZE",
    "MicroAdam",
    "micro_adam_step_",
]

# Chosen by measurement (benchmarks/block_sizes.py, docs/speed.md, "Choosing the block sizes"): on
# CPU every power-of-two pair runs within noise of the fastest; B = 4096 is the smallest
# block whose ceil(B * 1%) does not inflate k (1024 keeps 1.074%); Q = 256 reached the
# same loss as Q = 32 or 64 on the digits MLP with 5% less state than Q = 64.
DEFAULT_TOPK_BLOCK_SIZE = 4096
DEFAULT_QUANT_BLOCK_SIZE = 256

# Elements per chunk of the pure-PyTorch step on an accelerator: a chunk costs about 70
# small kernel launches whatever its size, so chunks are large, 16 MiB per float32
# temporary (the step's scratch peaks at about ten of them, far below a GPU's memory).
DEFAULT_CHUNK_SIZE = 1 << 22
# On the CPU, chunks stay below torch's intra-op grain (32768 elements), so that every op
# of the step runs on the calling thread. Each op on a larger tensor opens a parallel
# region, and on a machine busy with other work every region waits for a descheduled
# worker (a scheduler tick, ~4 ms): at 25M elements and 2 threads the step took 36 s with
# chunks of 2^17 and 0.76 s with chunks of 28672 (7 blocks), against 0.57 s for 2^17 on
# one thread. Most CPU steps take the fused kernel anyway (microadam.kernels).
CPU_CHUNK_SIZE = 32767
# Chunks are cut on multiples of lcm(topk_block_size, quant_block_size, 2) so that each
# chunk holds whole blocks and whole buckets and one pass does everything. When that lcm
# exceeds this many elements (unusual pairs such as 29056 and 100000) a second pass
# re-quantizes the error instead, keeping scratch memory bounded all the same.
MAX_ALIGNED_CHUNK = 1 << 21

# The ways to step, for ``fused``: the pure-PyTorch step, the torch.compile'd step, the
# fused Triton kernel (CUDA) and the fused C++ kernel (CPU).
PATHS = ("eager", "compiled", "triton", "cpu")
_PATH_NAMES = {
    "eager": "pure-PyTorch step",
    "compiled": "compiled step",
    "triton": "fused Triton step",
    "cpu": "fused CPU step",
}

STATE_FORMAT_VERSION = 1
_ROUNDINGS = ("nearest", "stochastic")
# Steps are counted in a float32 tensor (as torch.optim does), exact up to 2^24.
MAX_STEPS = 2**24 - 1


def chunk_length(device: torch.device) -> int:
    """Elements per chunk of the step on ``device`` before rounding down to whole units
    (module constants read at call time, so tests can shrink them)."""
    if device.type == "cpu":
        return min(DEFAULT_CHUNK_SIZE, CPU_CHUNK_SIZE)
    return DEFAULT_CHUNK_SIZE


def _too_many_steps(step: int) -> str:
    return (
        f"MicroAdam: a parameter's step count is {step}; the float32 step counter of its "
        f"state stops being exact at 2^24, so MicroAdam takes at most {MAX_STEPS} steps "
        "per parameter"
    )


# How much slower the pure step is than the fused C++ kernel on the CPU, for the fallback
# warning: 25x measured on 1M float32 parameters at the defaults, 5 steps each, one thread
# (torch.set_num_threads(1)), one process (25.1x, 25.1x and 30.1x in three runs).
PURE_CPU_SLOWDOWN = 25


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    check_lr(group["lr"])
    check_betas(group["betas"])
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    check_int("window_size", group["window_size"], 1)
    check_number("density", group["density"], "0 < density <= 1", lambda d: 0.0 < d <= 1.0)
    b = group["topk_block_size"]
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"Invalid topk_block_size: {b!r} (expected an integer, 1 <= topk_block_size <= 32768)"
        )
    check_int("quant_block_size", group["quant_block_size"], 1)
    bits = group["quant_bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (4, 8):
        raise ValueError(f"Invalid quant_bits: {bits!r} (expected 4 or 8)")
    check_flag("error_feedback", group["error_feedback"])
    check_choice("rounding", group["rounding"], _ROUNDINGS)
    vd = group["value_dtype"]
    if not isinstance(vd, torch.dtype) or not vd.is_floating_point:
        raise ValueError(f"Invalid value_dtype: {vd!r} (expected a floating torch.dtype)")
    check_flag("maximize", group["maximize"])
    fused = group["fused"]
    if not (fused is None or isinstance(fused, bool) or (type(fused) is str and fused in PATHS)):
        raise ValueError(
            f"Invalid fused: {fused!r} (expected None, True, False or one of "
            f"{', '.join(repr(path) for path in PATHS)})"
        )


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _column_offsets(layout: TopKLayout, j0: int, j1: int, device: torch.device) -> torch.Tensor:
    """Start, relative to block ``j0``, of the block that owns each window column of blocks
    ``j0 .. j1 - 1`` (int64, one entry per column)."""
    c0, c1 = layout.columns(j0, j1)
    cols = torch.arange(c0, c1, device=device, dtype=torch.int64)
    # Full block j owns columns [j k_block, (j+1) k_block); the short tail block (k_tail <=
    # k_block) owns the columns after them, so integer division lands on num_full for it.
    block = cols // max(layout.k_block, 1) if layout.k_block else torch.zeros_like(cols)
    return (block.clamp_(max=layout.num_full) - j0) * layout.block_size


def _codes_of(state: dict, start: int, end: int, bits: int) -> torch.Tensor:
    """Unpacked error-feedback codes of elements ``start .. end - 1`` (``start`` even)."""
    codes = state["ef_codes"]
    if bits == 4:
        return unpack_nibbles(codes[start // 2 : (end + 1) // 2], end - start)
    return codes[start:end]


def _store_packed(state: dict, start: int, packed: torch.Tensor, bits: int) -> None:
    """Write packed codes of elements from ``start`` on (``start`` even)."""
    offset = start // 2 if bits == 4 else start
    state["ef_codes"][offset : offset + packed.numel()] = packed


def _store_codes(state: dict, start: int, codes: torch.Tensor, bits: int) -> None:
    _store_packed(state, start, pack_nibbles(codes) if bits == 4 else codes, bits)


def _bucket_params(
    lo: torch.Tensor, hi: torch.Tensor, start: int, length: int, q: int, bits: int, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element ``lo`` and quantization step ``(hi - lo) / L`` for a range of elements."""
    b0, b1 = start // q, (start + length - 1) // q + 1
    lo_c = lo[b0:b1].to(dtype)
    step_c = (hi[b0:b1].to(dtype) - lo_c) / code_levels(bits)
    return expand_buckets(lo_c, start - b0 * q, length, q), expand_buckets(
        step_c, start - b0 * q, length, q
    )


def _corrected_gradient(
    grad: torch.Tensor, state: dict, start: int, end: int, h: dict, dtype: torch.dtype
) -> torch.Tensor:
    """Alg. 1 line 4: a = g + Q^-1(e) for elements ``start .. end - 1``, as a fresh tensor."""
    a = grad[start:end].to(dtype, copy=True)  # never alias p.grad: it is read, not written
    if h["maximize"]:
        a.neg_()
    if h["error_feedback"] and start % h["quant_block_size"] == 0:
        q, bits = h["quant_block_size"], h["quant_bits"]
        b0, b1 = start // q, -(-end // q)
        codes = state["ef_codes"]
        packed = codes[start // 2 : (end + 1) // 2] if bits == 4 else codes[start:end]
        a += dequantize(
            packed, state["ef_min"][b0:b1], state["ef_max"][b0:b1], end - start, q, bits, dtype
        )
    elif h["error_feedback"]:
        lo_e, step_e = _bucket_params(
            state["ef_min"],
            state["ef_max"],
            start,
            end - start,
            h["quant_block_size"],
            h["quant_bits"],
            dtype,
        )
        a += decode(_codes_of(state, start, end, h["quant_bits"]), lo_e, step_e)
    return a


def _noise(seed: int | None, step: int, start: int, length: int, a: torch.Tensor):
    """Stochastic rounding's noise for elements ``start ..`` (None: round to nearest)."""
    if seed is None:
        return None
    return uniform_noise(seed, step, start, length, device=a.device, dtype=a.dtype)


def _apply_update(p_chunk: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Alg. 1 line 12 with decoupled weight decay: p <- p (1 - lr wd) - lr u."""
    work = p_chunk if p_chunk.dtype == u.dtype else p_chunk.to(u.dtype)
    if weight_decay != 0:
        work.mul_(1.0 - lr * weight_decay)
    work.add_(u, alpha=-lr)
    if work is not p_chunk:
        p_chunk.copy_(work)


def micro_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
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
    chunk_size: int | None = None,
    max_aligned_chunk: int | None = None,
) -> None:
    """One MicroAdam step of one parameter, in place on ``param`` and ``state``.

    ``state`` must already hold the buffers of :meth:`MicroAdam._init_state`; ``grad`` is
    only read. ``chunk_size`` and ``max_aligned_chunk`` default to the module constants
    ``DEFAULT_CHUNK_SIZE`` and ``MAX_ALIGNED_CHUNK`` (read at call time, so tests can force
    the two-pass path); on the CPU chunks are capped at ``CPU_CHUNK_SIZE``. Off the CPU
    the step never waits for the device: ``step`` and ``rng_seed`` are host tensors, the
    decay weights come from a cache on the device, and no value is read back. The steps
    follow the design page (``docs/microadam.md``), numbered as in Alg. 1 of the paper.
    """
    if chunk_size is None:
        chunk_size = chunk_length(param.device)
    elif param.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK_SIZE)
    max_aligned_chunk = MAX_ALIGNED_CHUNK if max_aligned_chunk is None else max_aligned_chunk
    h = {
        "maximize": maximize,
        "error_feedback": error_feedback,
        "quant_block_size": quant_block_size,
        "quant_bits": quant_bits,
    }
    d = param.numel()
    # step and rng_seed live on the CPU (load_state_dict puts them there): reading them
    # never waits for an accelerator.
    step = int(state["step"].item()) + 1
    seed = int(state["rng_seed"].item()) if rounding == "stochastic" else None
    if step > MAX_STEPS:
        raise RuntimeError(_too_many_steps(step - 1))
    layout = topk_layout(d, topk_block_size, density)
    row = (step - 1) % window_size
    rows = min(step, window_size)
    dtype = _compute_dtype(param)
    flat_grad = grad.reshape(-1)
    target = param if param.is_contiguous() else param.contiguous()
    flat_param = target.view(-1)
    win_idx, win_val = state["window_indices"], state["window_values"]
    q, bits = quant_block_size, quant_bits

    aligned_unit = math.lcm(topk_block_size, quant_block_size, 2)
    one_pass = not error_feedback or aligned_unit <= max(max_aligned_chunk, chunk_size)
    unit = aligned_unit if (error_feedback and one_pass) else math.lcm(topk_block_size, 2)
    chunk = unit * max(1, chunk_size // unit)
    if error_feedback and not one_pass:
        num_buckets = state["ef_min"].numel()
        new_lo = torch.full((num_buckets,), math.inf, dtype=dtype, device=param.device)
        new_hi = torch.full((num_buckets,), -math.inf, dtype=dtype, device=param.device)

    chunks = []
    for start in range(0, d, chunk):
        end = min(d, start + chunk)
        j0, j1 = start // topk_block_size, -(-end // topk_block_size)
        c0, c1 = layout.columns(j0, j1)
        offsets = _column_offsets(layout, j0, j1, param.device)
        chunks.append((start, end, j0, j1))  # ints only: nothing of size k outlives a chunk

        a = _corrected_gradient(flat_grad, state, start, end, h, dtype)
        # Alg. 1 lines 5-6: Top-K per block, recorded as row (t - 1) mod m of the window.
        idx, vals = block_topk(a, topk_block_size, layout.k_block, layout.k_tail)
        win_idx[row, c0:c1] = idx
        win_val[row, c0:c1] = saturating_cast(vals, win_val.dtype)
        if error_feedback:
            # Alg. 1 line 7: the error is what Top-K dropped.
            a.index_fill_(0, idx.to(torch.int64) + offsets, 0)
            if one_pass:
                noise = _noise(seed, step, start, end - start, a)
                codes, lo, hi = quantize(a, q, bits, noise)
                _store_packed(state, start, codes, bits)
                state["ef_min"][start // q : start // q + lo.numel()] = lo
                state["ef_max"][start // q : start // q + hi.numel()] = hi
            else:
                b0 = start // q
                ids = torch.arange(start, end, device=a.device) // q - b0
                nb = (end - 1) // q - b0 + 1
                new_lo[b0 : b0 + nb].scatter_reduce_(0, ids, a, "amin")
                new_hi[b0 : b0 + nb].scatter_reduce_(0, ids, a, "amax")
        del a
        # Alg. 1 lines 9-12: Adam's moments from the window, then the update.
        u = window_direction(
            win_idx[:rows, c0:c1],
            win_val[:rows, c0:c1],
            offsets,
            end - start,
            step,
            window_size,
            betas,
            eps,
            dtype,
        )
        _apply_update(flat_param[start:end], u, lr, weight_decay)

    if error_feedback and not one_pass:
        # Second pass: the bucket ranges are complete, so quantize the error now. The
        # corrected gradient is rebuilt from the old codes, which are still in place.
        lo_all, hi_all = new_lo.to(torch.bfloat16), new_hi.to(torch.bfloat16)
        for start, end, j0, j1 in chunks:
            c0, c1 = layout.columns(j0, j1)
            offsets = _column_offsets(layout, j0, j1, param.device)
            a = _corrected_gradient(flat_grad, state, start, end, h, dtype)
            a.index_fill_(0, win_idx[row, c0:c1].to(torch.int64) + offsets, 0)
            lo_e, step_e = _bucket_params(lo_all, hi_all, start, end - start, q, bits, dtype)
            codes = encode(a, lo_e, step_e, bits, _noise(seed, step, start, end - start, a))
            _store_codes(state, start, codes, bits)
        state["ef_min"].copy_(lo_all)
        state["ef_max"].copy_(hi_all)

    if target is not param:
        param.copy_(target)
    state["step"] += 1


class MicroAdam(NonFiniteSteps, Optimizer):
    r"""MicroAdam: Adam-quality updates with under one byte of optimizer state per parameter.

    MicroAdam (Modoranu et al., NeurIPS 2024) keeps no dense moments. Each step it adds the
    dequantized error-feedback buffer to the gradient, keeps the Top-K entries of every
    block in a sliding window of the last :math:`m` sparse gradients, stores what Top-K
    dropped as 4-bit error feedback, and rebuilds Adam's moments from the window.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt} \\
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
                \epsilon, \lambda \text{ (weight decay)}, m \text{ (window\_size)},
                k/d \text{ (density)}, b \text{ (quant\_bits)} \\
            &\textbf{initialize}: e_0 \leftarrow 0 \text{ (b-bit codes)},\;
                \mathcal{W} \leftarrow \text{empty window of } m \text{ rows} \\
            &\rule{110mm}{0.4pt} \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \quad (-\nabla \text{ if maximize}) \\
            &\hspace{5mm} a_t \leftarrow g_t + Q^{-1}(e_t) \\
            &\hspace{5mm} I_t \leftarrow \text{Top-}k_B(|a_t|) \text{ in every block of }
                B \text{ elements} \\
            &\hspace{5mm} \mathcal{W}[(t-1) \bmod m] \leftarrow (I_t, a_t[I_t]) \\
            &\hspace{5mm} a_t[I_t] \leftarrow 0; \quad e_{t+1} \leftarrow Q(a_t)
                \text{ (per bucket of } Q \text{ elements, bf16 min/max)} \\
            &\hspace{5mm} M \leftarrow \textstyle\sum_r \beta_1^{\,age_r} V_r, \quad
                S \leftarrow \textstyle\sum_r \beta_2^{\,age_r} V_r^2 \\
            &\hspace{5mm} \hat{m} \leftarrow (1-\beta_1) M / (1-\beta_1^t), \quad
                \hat{v} \leftarrow (1-\beta_2) S / (1-\beta_2^t) \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                - \gamma\, \hat{m} / (\sqrt{\hat{v}} + \epsilon) \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return} \: \theta_t \\[-1.ex]
            &\rule{110mm}{0.4pt} \\[-1.ex]
       \end{aligned}

    Here :math:`age_r = (t - 1 - r) \bmod m` is the age of window row :math:`r`, and the
    sums run over the rows written so far that contain the coordinate; a coordinate in no
    row is not moved (apart from weight decay).

    .. note::
        Conventions. ``eps`` is added to :math:`\sqrt{\hat v}` outside the square root, as
        in ``torch.optim.Adam``. Weight decay is decoupled (AdamW). The bias correction
        uses this parameter's full step count :math:`t`, as the authors' code does: for a
        coordinate kept at every step the window holds only :math:`m` terms while
        :math:`1-\beta^t` keeps growing, so once :math:`t > m` the step is larger than
        Adam's (with a constant gradient about 2.8x at :math:`t = 200` and 6.5x in the
        limit at :math:`m = 10` and the default betas). Dividing by
        :math:`1-\beta^{\min(t, m)}` instead was measured and not adopted: it did not
        improve fine-tuning and was worse from scratch (docs/finetune.md). With
        ``density=1``, ``window_size`` at least the number of steps and ``value_dtype``
        equal to the parameter dtype, MicroAdam equals ``torch.optim.AdamW``.

    .. note::
        Non-finite gradients. ``step`` checks every gradient before it changes anything;
        if any holds NaN or inf it raises ``NonFiniteGradientError`` (a ``RuntimeError``)
        naming the parameter and leaves every parameter and every state buffer as it was,
        so the caller can skip the batch (``zero_grad()`` and continue) or stop. With
        ``nonfinite="skip"`` (for training loops that cannot catch it, such as a Trainer's)
        the step is skipped instead, as ``torch.amp.GradScaler`` skips such steps: nothing
        changes, a ``RuntimeWarning`` names the parameter, and :attr:`skipped_steps`
        counts it (kept in every param group, so it is saved in the state dict).

    .. note::
        Stochastic rounding (``rounding="stochastic"``, the unbiased quantizer of the
        convergence proof) draws its noise from a counter-based generator: element
        :math:`i` at step :math:`t` gets a fixed hash of (seed, t, i). The seed is drawn
        from torch's default generator when the state is created (so ``torch.manual_seed``
        makes runs repeatable) and kept in the state as ``rng_seed``; resuming from a
        checkpoint continues the same stream.

    .. note::
        The fused CPU step. On the CPU, parameters of float32, bfloat16 or float16 with
        gradients of the same dtype and a ``value_dtype`` among those three take a fused
        C++/OpenMP kernel (:mod:`microadam.kernels.micro_adam_cpu`; its speed beside
        ``AdamW(fused=True)`` and the pure step, measured by ``microadam speed``, is in
        docs/speed.md). It keeps the same state (checkpoints move freely between the two),
        selects the same Top-K indices and writes the same window values and error codes on
        tie-free inputs, and the same parameters up to 2 ulp. It is compiled on the first
        fused step of a machine (about 10-20 s, then cached in torch's extension directory);
        if that fails (no C++ compiler, no OpenMP), ``fused=None`` warns once and falls back
        to the pure step. Not covered, so left to the pure step under ``fused=None``:
        float64 parameters, other devices, tensor subclasses other than DTensor (a DTensor
        parameter is stepped on its local shard, a plain tensor the kernel takes), a
        gradient dtype different from the parameter's, and block sizes with
        ``lcm(topk_block_size, quant_block_size) > 2^20``. The environment variable
        ``MICROADAM_DISABLE_FUSED=1`` (read once per process) turns the kernel off.

    .. note::
        GPUs. On CUDA, ``fused=None`` takes the fused Triton kernel
        (:mod:`microadam.kernels.micro_adam_triton`) where it applies, else the compiled
        step (:mod:`microadam.kernels.micro_adam_compiled`, ``torch.compile`` of the pure
        step's chunk, compiled on the first step), else the pure step. None of them waits
        for the device inside a step: the only host read is the one non-finite check of
        all gradients, ``step`` and ``rng_seed`` stay CPU tensors, and the pure step's
        decay weights are cached on the device. Every path keeps the same state, bit for
        bit on tie-free inputs, whatever the GPU model, so checkpoints move between paths
        and devices (docs/gpu.md).

    .. note::
        Distributed training. Under DDP every rank holds the same averaged gradient and
        steps the same replica; MicroAdam needs nothing special (measured: bit-identical to
        one process on the global batch, ``tests/distributed``; docs/distributed.md). Under FSDP2
        (``fully_shard``; parameters are DTensors sharded on dim 0) each rank steps its
        local shard (``p.to_local()``, ``p.grad.to_local()``, views of the local storage)
        and keeps that shard's state, about ``1 / world_size`` of the single-process
        bytes. Top-K blocks and quantization buckets are cut per shard, so the run is
        close to, not bit-identical with, a one-process run. The non-finite gradient check
        is agreed over the ranks (one small all-reduce per step), so every rank raises or
        none does. For ``torch.distributed.checkpoint``, :meth:`state_dict` presents each
        per-shard state tensor as a DTensor of global shape ``(num_shards, *shape)``
        sharded on dim 0 over the parameter's mesh (zero-padded to the largest shard), so
        DCP saves every rank's own state; resuming in the same world size is bit-exact.
        Per-shard state cannot be resharded: loading into another world size, or into
        unsharded parameters, fails in DCP's planner with a size mismatch for the
        parameter's state key (the leading dimension is the number of shards), and in
        :meth:`load_state_dict` with a ``ValueError`` naming the parameter and both shard
        counts.

    Memory: for a parameter of :math:`d` elements, with :math:`k` entries kept per step in
    each of the :math:`m` window rows and error-feedback buckets of :math:`Q` elements, the
    state is (:data:`microadam.optim.micro_adam_state.STATE_LAYOUT`, the one definition):

    {state_layout}

    In all :math:`0.5d + 4mk + 4\lceil d/Q\rceil` bytes, about 0.92 bytes per parameter
    at the defaults (m = 10, density 1%, Q = 256). ``step`` uses scratch memory for one
    chunk of blocks (about 2^22 elements on an accelerator, 2^15 on the CPU), never a
    float32 copy of the whole parameter.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        betas (Tuple[float, float], optional): decay rates of the first and second moment
            (default: (0.9, 0.999)).
        eps (float, optional): added to :math:`\sqrt{\hat v}` (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0).
        window_size (int, optional): :math:`m`, gradients kept in the window (default: 10).
        density (float, optional): :math:`k/d`, fraction of each Top-K block kept per step,
            ``0 < density <= 1`` (default: 0.01).
        topk_block_size (int, optional): elements per Top-K block, 1 to 32768; each full
            block keeps ``ceil(density * topk_block_size)`` (default: 4096). The authors'
            A100 and H100 layouts are 20864 and 29056.
        quant_block_size (int, optional): elements per error-feedback bucket, each with its
            own bf16 min and max (default: 256). Keep lcm(topk_block_size,
            quant_block_size) at most 2^21 (any powers of two do): larger pairs, such as the
            authors' 100000 with 4096, take a two-pass step that is about 1.7x slower.
        quant_bits (int, optional): 4 or 8 bits per error-feedback element (default: 4).
        error_feedback (bool, optional): ``False`` gives Top-K Adam without error feedback
            (default: True).
        rounding (str, optional): ``"nearest"`` (as the authors' code) or ``"stochastic"``
            (the unbiased quantizer of the convergence proof) (default: "nearest").
        value_dtype (torch.dtype, optional): dtype of the stored window values
            (default: torch.bfloat16).
        maximize (bool, optional): maximize the objective instead (default: False).
        fused (bool or str, optional): how to step (default: None, the best path that
            applies: on the CPU the fused C++ kernel, on CUDA the fused Triton kernel, then
            the compiled step, and the pure-PyTorch step everywhere else). ``True`` requires
            the device's fused kernel (C++ on the CPU, Triton on CUDA), ``False`` or
            ``"eager"`` is the pure-PyTorch step, and ``"cpu"``, ``"triton"`` or
            ``"compiled"`` (``torch.compile`` of the pure step's chunk) require that path.
            A required path that does not apply raises ``RuntimeError`` at ``step`` before
            anything changes. All paths keep the same state, so a checkpoint moves between
            them; ``load_state_dict`` keeps this optimizer's ``fused``. See the notes on the
            fused CPU step and on GPUs.
        nonfinite (str, optional): what ``step`` does when a gradient holds NaN or inf:
            ``"raise"`` (``NonFiniteGradientError``) or ``"skip"`` the whole step (a
            warning, and :attr:`skipped_steps` counts it); either way nothing is updated
            (default: "raise").

    Example:
        >>> import torch
        >>> from microadam import MicroAdam
        >>> model = torch.nn.Linear(64, 8)
        >>> opt = MicroAdam(model.parameters(), lr=1e-3, density=0.05)
        >>> loss = model(torch.randn(16, 64)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()

    References:
        I. Modoranu, M. Safaryan, G. Malinovsky, E. Kurtic, T. Robert, P. Richtarik,
        D. Alistarh. "MicroAdam: Accurate Adaptive Optimization with Low Space Overhead and
        Provable Convergence." NeurIPS 2024. arXiv:2405.15593.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        window_size: int = 10,
        density: float = 0.01,
        topk_block_size: int = DEFAULT_TOPK_BLOCK_SIZE,
        quant_block_size: int = DEFAULT_QUANT_BLOCK_SIZE,
        quant_bits: int = 4,
        error_feedback: bool = True,
        rounding: str = "nearest",
        value_dtype: torch.dtype = torch.bfloat16,
        maximize: bool = False,
        fused: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            window_size=window_size,
            density=density,
            topk_block_size=topk_block_size,
            quant_block_size=quant_block_size,
            quant_bits=quant_bits,
            error_feedback=error_feedback,
            rounding=rounding,
            value_dtype=value_dtype,
            maximize=maximize,
            fused=fused,
            nonfinite=nonfinite,
        )
        _validate_hyperparameters(defaults)
        super().__init__(params, defaults)
        # The settings each parameter's state was last checked against (not saved).
        self._checked: dict[torch.Tensor, tuple] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_hyperparameters(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, parameter)
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise RuntimeError(
                    "MicroAdam does not support complex parameters; optimize "
                    "torch.view_as_real(param) as a real parameter instead"
                )
        super().add_param_group({**param_group, "params": params})

    # -- state -------------------------------------------------------------------------

    def _expected_state(
        self, p: torch.Tensor, group: dict[str, Any], numel: int | None = None
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
        """``key -> (shape, dtype, on_cpu)`` of ``p``'s state (of its local shard for a
        DTensor; of ``numel`` elements if given), from :data:`STATE_LAYOUT`."""
        d = _sharding.local(p).numel() if numel is None else numel
        return expected_state(d, group)

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            for key, (shape, dtype, on_cpu) in self._expected_state(p, group).items():
                if key != "rng_seed":  # drawn below, also when rounding changes later
                    device = "cpu" if on_cpu else p.device
                    state[key] = torch.zeros(shape, dtype=dtype, device=device)
        if group["rounding"] == "stochastic" and "rng_seed" not in state:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            state["rng_seed"] = torch.tensor(seed, dtype=torch.int64)
        # The full check once per parameter, state and setting (it costs more than a small
        # fused step): again only after a load or a change of the group's settings.
        signature = (id(state), p.shape, *(group[key] for key in LAYOUT_KEYS))
        if self._checked.get(p) != signature:
            self._check_state(p, group, state, "the current hyperparameters")
            self._checked[p] = signature
        return state

    def _check_state(self, p, group, state, origin: str) -> None:
        """Raise if ``state`` does not fit parameter ``p`` under ``group``'s settings."""
        where = LazyText(lambda: self._describe(p))
        for key, (shape, dtype, _) in self._expected_state(p, group).items():
            if key not in state:
                if key == "rng_seed":  # drawn at the next step (rounding switched later)
                    continue
                raise RuntimeError(
                    f"MicroAdam state of {where} has no {key!r}, which {origin} need "
                    "(error_feedback cannot be switched on after the first step)"
                )
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(
                    f"MicroAdam state of {where}: {key} is a {type(value).__name__}, "
                    "expected a tensor"
                )
            got = tuple(value.shape)
            if got != shape:
                raise RuntimeError(
                    f"MicroAdam state of {where}: {key} has shape {got}, expected {shape} "
                    f"from {origin} (param shape {tuple(p.shape)}, window_size, density, "
                    "block sizes and quant_bits cannot change after the first step)"
                )
            # A step count of any real dtype is taken, as torch.optim takes it.
            if key != "step" and value.dtype != dtype:
                raise RuntimeError(
                    f"MicroAdam state of {where}: {key} has dtype {value.dtype}, "
                    f"expected {dtype} from {origin}"
                )

    def _describe(self, p: torch.Tensor) -> str:
        return describe_param(self.param_groups, p)

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns
                the loss.
        """
        loss = run_closure(closure)
        # Check every gradient before touching anything, so a bad one changes nothing.
        # A DTensor parameter (FSDP2) steps on its local shard: to_local() views the local
        # storage, so the in-place update lands in the parameter; its state is per shard.
        work = []  # (group, p, local p, local grad, path)
        for group, p in params_with_grad("MicroAdam", self.param_groups):
            lp, lg = _sharding.local(p), _sharding.local(p.grad)
            work.append((group, p, lp, lg, self._path(group, p, lp, lg)))
        # All at once (one host read per device; DTensors agreed over the ranks), except
        # plain parameters on the fused CPU path: the kernel checks those itself. A bad one
        # raises or skips the step (nonfinite).
        if not self._gradients_finite(
            "MicroAdam",
            [p for _, p, _, _, path in work if path != "cpu" or _sharding.is_dtensor(p)],
            self._describe,
        ):
            return loss
        # What this step adds to the state before the kernel has checked its gradients:
        # taken back if one is bad, so that the step changes nothing.
        fresh = [p for _, p, _, _, _ in work if len(self.state[p]) == 0]
        unseeded = [
            p
            for group, p, _, _, _ in work
            if group["rounding"] == "stochastic" and "rng_seed" not in self.state[p]
        ]

        def take_back() -> None:
            for p in unseeded:
                self.state[p].pop("rng_seed", None)
            for p in fresh:
                del self.state[p]

        batches: dict[tuple[int, str], tuple[dict, list]] = {}
        to_check = []  # DTensor gradients were checked above, across ranks
        for group, p, lp, lg, path in work:
            state = self._init_state(p, group)
            batches.setdefault((id(group), path), (group, []))[1].append((lp, lg, state))
            if path == "cpu" and not _sharding.is_dtensor(p):
                to_check.append((p, lg))
        for _, items in batches.values():
            for _, _, state in items:
                if int(state["step"].item()) >= MAX_STEPS:
                    take_back()
                    raise RuntimeError(_too_many_steps(int(state["step"].item())))
        # The fused CPU kernel checks the gradients of every parameter it steps (on its
        # first call of the step, in the same parallel region) and updates nothing if one
        # is bad: so its batches go first, and a bad gradient there leaves every parameter
        # as it was.
        ordered = sorted(batches.items(), key=lambda item: item[0][1] != "cpu")
        for (_, path), (group, items) in ordered:
            params, grads, states = ([item[i] for item in items] for i in range(3))
            hyper = _step_arguments(group)
            if path == "cpu":
                from microadam.kernels.micro_adam_cpu import micro_adam_multi_step_

                bad = micro_adam_multi_step_(
                    params, grads, states, check_grads=[lg for _, lg in to_check], **hyper
                )
                if bad is not None:
                    take_back()
                    self._non_finite("MicroAdam", to_check[bad][0], self._describe)
                    return loss
                to_check = []
            elif path == "triton":
                from microadam.kernels.micro_adam_triton import micro_adam_multi_step_

                micro_adam_multi_step_(params, grads, states, **hyper)
            elif path == "compiled":
                from microadam.kernels.micro_adam_compiled import micro_adam_multi_step_

                micro_adam_multi_step_(params, grads, states, **hyper)
            else:
                for lp, lg, state in items:
                    micro_adam_step_(lp, lg, state, **hyper)
        return loss

    def _path(
        self, group: dict[str, Any], p: torch.Tensor, lp: torch.Tensor, lg: torch.Tensor
    ) -> str:
        """Which of :data:`PATHS` steps ``p`` (as ``lp`` with gradient ``lg``, its local
        shard if ``p`` is a DTensor); raises if the path ``fused`` asks for cannot take it."""
        mode = group["fused"]
        path, reason = choose_path(mode, lp.device.type, lambda q: self._reason(q, group, lp, lg))
        if reason is not None:
            raise RuntimeError(
                f"MicroAdam(fused={mode!r}): the {_PATH_NAMES[path]} does not cover "
                f"{self._describe(p)}: {reason}. Pass fused=None to use the best step that "
                "applies; nothing was updated"
            )
        return path

    def _reason(
        self, path: str, group: dict[str, Any], lp: torch.Tensor, lg: torch.Tensor
    ) -> str | None:
        """Why ``path`` cannot step ``lp`` under ``group``'s settings, or None. Under
        ``fused=None`` a CPU kernel that fails to build warns once, here."""
        if path == "cpu":
            from microadam.kernels import micro_adam_cpu as kernel
        elif path == "triton":
            from microadam.kernels import micro_adam_triton as kernel
        else:
            from microadam.kernels import micro_adam_compiled as kernel
        reason = kernel.unsupported_reason(lp, lg, group)
        if reason is None:
            reason = kernel.unavailable_reason()  # may build it, on first use
        if reason is not None and path == "cpu" and group["fused"] is None:
            message = kernel.take_fallback_warning()
            if message is not None:
                warnings.warn(
                    f"{message} The pure-PyTorch step is about {PURE_CPU_SLOWDOWN}x slower "
                    "than the fused one on the CPU.",
                    RuntimeWarning,
                    stacklevel=caller_stacklevel(),
                )
        return reason

    # -- checkpoints ---------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._checked = {}
        for group in self.param_groups:
            group.setdefault("fused", None)  # state dicts saved before ``fused`` existed

    def state_dict(self) -> dict[str, Any]:
        """The state dict, with ``microadam_format`` (the layout version) at the top level
        and in every param group (``torch.distributed.checkpoint.state_dict`` keeps only the
        ``state`` and ``param_groups`` entries).

        The state of a DTensor parameter (FSDP2) is per shard; each of its state tensors
        but ``step`` comes as a DTensor sharded over the parameter's mesh, so that
        ``torch.distributed.checkpoint`` saves and loads every rank's own state (see
        :mod:`microadam.optim._sharding`). Plain parameters' state is as in torch.optim.
        """
        sd = super().state_dict()
        sd["microadam_format"] = STATE_FORMAT_VERSION
        sd["param_groups"] = [
            {**g, "microadam_format": STATE_FORMAT_VERSION} for g in sd["param_groups"]
        ]
        self._shard_state_for_checkpoint(sd)
        return sd

    # DTensor parameters in checkpoints: kept apart from load_state_dict's own checks.

    def _shard_state_for_checkpoint(self, sd: dict[str, Any]) -> None:
        """Replace, in ``sd`` (from ``Optimizer.state_dict``), the per-shard state tensors
        of DTensor parameters by DTensors sharded on dim 0 over the parameter's mesh."""

        def layout(p: torch.Tensor, group: dict[str, Any], state: dict) -> tuple[dict, dict]:
            biggest = math.prod(_sharding.max_local_shape(p))
            shapes = {key: s for key, (s, _, _) in self._expected_state(p, group, biggest).items()}
            return state, {**shapes, "rng_seed": ()}

        ids = params_by_saved_id(self.param_groups, sd["param_groups"])
        _sharding.shard_states(sd["state"], ids, layout, self._describe)

    def _local_state_for_load(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the layout version at the top level (also when
        ``torch.distributed.checkpoint.state_dict`` dropped it), without the per-group
        copies, and with the per-shard state of DTensor parameters back as this rank's
        plain tensors; ``ValueError`` when it was saved for another sharding."""
        state_dict = lift_format_key(state_dict, "microadam_format")
        if "state" not in state_dict:
            return state_dict

        def local_shapes(p: torch.Tensor, group: dict[str, Any], saved: dict) -> dict:
            try:
                shapes = {key: s for key, (s, _, _) in self._expected_state(p, group).items()}
            except (KeyError, TypeError):  # bad settings: the checks report them
                shapes = {}
            return {**shapes, "rng_seed": ()}

        ids = params_by_saved_id(self.param_groups, state_dict["param_groups"])
        state = _sharding.local_states(state_dict["state"], ids, local_shapes, self._describe)
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`, keeping every buffer's dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's
        dtype, which would turn the int16 window indices into bf16 (wrong above 256) and
        the uint8 codes into floats. Here every state tensor comes back with its saved
        dtype and bits, on its parameter's device. The state dict is checked against the
        parameters first; on a mismatch a ``ValueError`` names the parameter and what
        differs, and the optimizer is left as it was. Load hooks run as in ``torch.optim``,
        and a ``step`` saved as a Python number is taken as torch.optim takes it
        (:func:`~microadam.optim._common.load_checked_state_dict`).
        """
        self._checked.clear()  # every state is checked again at the next step

        def check_group(group: dict, merged: dict, index: int) -> None:
            _validate_hyperparameters(merged)

        def check_state(p: torch.Tensor, merged: dict, saved: dict) -> None:
            self._check_state(p, merged, saved, "the state dict's param group")

        def restore(p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
            # Every tensor exactly as saved (a private copy, so the loaded optimizer never
            # shares buffers with the caller's dict); step and rng_seed are read on the host
            # at every step, so they stay on the CPU whatever map_location put them on.
            device = "cpu" if key in CPU_KEYS else p.device
            return value.detach().to(device=device, copy=True)

        load_checked_state_dict(
            self,
            state_dict,
            check_group=check_group,
            check_state=check_state,
            restore=restore,
            prepare=self._local_state_for_load,  # DTensor params, DCP dicts
            format_key="microadam_format",
            version=STATE_FORMAT_VERSION,
            name="MicroAdam",
            # ``fused`` says how this process steps, not what the state is: a checkpoint
            # written on any path and device continues on the path this optimizer has.
            keep_group_keys=("fused",),
            # The saved state's shapes follow these: a changed one warns, the saved is kept.
            layout_keys=LAYOUT_KEYS,
        )


MicroAdam.__doc__ = MicroAdam.__doc__.replace(
    "{state_layout}", memory_formula().replace("\n", "\n    ")
)


def choose_path(
    fused: bool | str | None, device_type: str, reason: Callable[[str], str | None]
) -> tuple[str, str | None]:
    """The path that ``fused`` picks on a device of ``device_type``, and why it cannot be
    taken (None when it can). ``reason(path)`` says why a path does not apply, or None.

    ``fused=None`` falls back along the device's paths, best first, to the pure step: on
    the CPU the C++ kernel; on CUDA the Triton kernel, then the compiled step; elsewhere
    the pure step (inductor's support for other devices varies: ask for
    ``fused="compiled"``). ``True`` is the device's fused kernel, a string that path.
    """
    if fused is False or fused == "eager":
        return "eager", None
    if fused is None:
        candidates = {"cpu": ("cpu",), "cuda": ("triton", "compiled")}.get(device_type, ())
        for path in candidates:
            if reason(path) is None:
                return path, None
        return "eager", None
    path = fused if isinstance(fused, str) else ("triton" if device_type == "cuda" else "cpu")
    return path, reason(path)


_STEP_ARGUMENTS = (
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
    "maximize",
)


def _step_arguments(group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of every path's step function, with a tensor ``lr`` read once
    (one host read per group and step)."""
    lr = group["lr"]
    return {
        "lr": lr.item() if isinstance(lr, torch.Tensor) else lr,
        **{key: group[key] for key in _STEP_ARGUMENTS},
    }
