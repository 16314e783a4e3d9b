"""The fused MicroAdam step as one Triton kernel: CUDA tensors, and CPU tensors under the
Triton interpreter (``TRITON_INTERPRET=1``, which is how CI tests it).

What it computes. :func:`micro_adam_multi_step_` performs one step of
:func:`microadam.optim.micro_adam.micro_adam_step_` for several parameters of one param
group and produces exactly its state: the same window row ``(t - 1) mod m`` (block-local
int16 indices ascending within each block, values cast to ``value_dtype``), the same packed
error codes and bf16 bucket ranges, the same ``step``; the parameters agree to 2 ulp (in
practice bit for bit). Each Top-K block is handled by one program, in one pass:

1. ``a = g (negated if maximize) + (code * u + lo)``, ``u = (hi - lo) / L`` per bucket from
   the stored bf16 range, all in float32.
2. Top-K of ``|a|`` by an exact search: non-negative floats order like their int32 bit
   patterns, so 31 rounds of bisection on the pattern find the k-th largest; the block
   keeps every pattern above it and the first ties in index order, exactly k.
3. The kept block-local indices, compacted in ascending order by a cumulative sum over the
   keep mask, go to window row ``(t - 1) mod m`` with ``a`` at them.
4. With error feedback the kept entries are zeroed, each bucket's range becomes
   ``lo = bf16(min)``, ``hi = bf16(max)``, and ``code = clamp(trunc((a - lo) / u + 1/2 or
   xi), 0, L)`` (0 where ``u == 0``), packed two per byte at 4 bits (even element in the
   high nibble). ``xi`` is :func:`microadam.compress.quant.uniform_noise`'s counter-based
   noise, from the element's index in the tensor and ``noise_key(seed, t)``.
5. After a barrier the block's window entries of all ``min(t, m)`` written rows are read
   back; each finds its coordinate in every row by binary search (a block's part of a row
   is sorted) and sums ``decay1[r] * v`` and ``decay2[r] * (v * v)`` over the rows in
   storage order, from 0, as ``index_add_`` does. Then ``u = M c1 / (sqrt(S c2) + eps)``,
   0 where the denominator is 0, and ``p = fma(u, -lr, p (1 - lr wd))`` at the window's
   coordinates: the entries' parameters are gathered first; after a barrier, with weight
   decay, the whole block is decayed; after another the entries are written (a coordinate
   in several rows writes the same value). bf16 and float16 parameters are computed in
   float32 and rounded once.

The host computes, per launch and exactly as the pure path does, t, the window row, the
rows' decay weights ``beta ** age`` and the bias corrections (Python doubles, then
float32), ``1 - lr wd``, ``-lr`` and each parameter's noise key; it reads ``step`` and
``rng_seed`` from their CPU tensors and increments ``step``. Nothing synchronises with the
device: the launch's table (tensor addresses, sizes, noise keys, decay weights) is copied
from pinned memory without blocking.

Launches. The tensors of one call that share device, dtypes and step (a parameter without
a gradient on some step falls behind the others) share one launch. A program takes G
consecutive blocks of the launch (G = 1 for blocks of 4096 on a GPU, more for small
blocks, many under the interpreter, whose cost is per operation) as the rows of its tiles;
each block finds its tensor by binary search in the table's cumulative block counts, so
the blocks of one program may belong to different tensors.

Exactness rules, and why. The state must be bit-identical to the PyTorch path's, so each
operation rounds as torch rounds it on the CPU: no FMA contraction (``enable_fp_fusion=
False``; the final update is an explicit ``tl.fma`` because torch's vectorised
``add_(u, alpha=-lr)`` is one, and without it parameters drift apart by more than 2 ulp
within a few steps), IEEE division and square root (``div_rn``, ``sqrt_rn``; Triton's
``/`` and ``sqrt`` are approximate on NVIDIA GPUs), the pure path's order of operations.
Casts to bf16 (window values, ``ef_min``/``ef_max``, bf16 parameters) are rounded to
nearest even with integer operations first, because the interpreter truncates float32 to
bf16; casting a value that bf16 represents is exact everywhere, so the interpreter and a
GPU write the same bits. float16 casts round correctly in both.

The interpreter. ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function,
and this module decorates its kernel on first use, once per mode, so the variable need
only be set before the first step. triton's own jitted helpers (``tl.sum``, ``tl.cumsum``,
``tl.zeros``...) are decorated when triton is imported, though, so the kernel uses only
builtins (``tl.reduce`` and ``tl.associative_scan`` with triton's standard combine
functions, which the interpreter recognises and runs as numpy reductions).

Not covered (``unsupported_reason`` says so, and the caller takes another path): float64
parameters, a gradient dtype other than the parameter's, ``value_dtype`` other than
float32/bfloat16/float16, devices other than CUDA (the CPU only under the interpreter: it
has its own C++ kernel), tensor subclasses, a ``quant_block_size`` that does not divide
``topk_block_size`` (buckets would straddle blocks), an odd ``quant_block_size`` with
4-bit codes (a byte would straddle buckets), and more than 65536 window entries per block
(``window_size * ceil(density * topk_block_size)``). ``topk_block_size`` goes up to the
optimizer's 32768 (blocks above 4096 spill registers on a GPU). The caller checks gradients
for NaN and inf beforehand. A window index outside its block (a corrupted state) is
skipped rather than reported, since reporting it would need a device sync.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

import torch

from microadam.compress.quant import noise_key
from microadam.compress.topk import kept_per_block

__all__ = [
    "MAX_ENTRY_TILE",
    "SUPPORTED_DTYPES",
    "micro_adam_multi_step_",
    "unavailable_reason",
    "unsupported_reason",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The m * k window entries of one block live in one tile of a program.
MAX_ENTRY_TILE = 1 << 16
# Steps are counted in a float32 tensor, exact up to 2^24 (MAX_STEPS of optim/micro_adam).
_MAX_STEPS = 2**24 - 1
# The launch table (int64): per tensor 12 fields, the addresses of the parameter, the
# gradient, window_indices, window_values, ef_codes, ef_min, ef_max (0 without error
# feedback), then numel, its first block in the launch, the window's width k, k of its
# short last block, its noise key; after the tensors, the rows' float32 decay weights
# (bit patterns), beta1's then beta2's. The kernel reads the fields by these numbers.
_FIELDS = 12

triton: Any = None  # imported on first use, so that this module imports without triton
tl: Any = None
_import_error: BaseException | None = None
_kernels: dict[bool, Any] = {}


def _import_triton() -> bool:
    global triton, tl, _import_error
    if triton is None and _import_error is None:
        try:
            import triton as triton_module
            import triton.language as tl_module
        except Exception as err:  # not installed, or broken: the caller takes another path
            _import_error = err
        else:
            triton, tl = triton_module, tl_module
    return triton is not None


def unavailable_reason() -> str | None:
    """``None`` when triton can be imported, else why not."""
    if _import_triton():
        return None
    err = _import_error
    if isinstance(err, ModuleNotFoundError) and err.name == "triton":
        return "triton is not installed (pip install 'microadam[triton]')"
    return f"triton could not be imported ({type(err).__name__}: {err})"


def _interpreting() -> bool:
    """Whether ``triton.jit`` would make an interpreted function now."""
    knobs = getattr(triton, "knobs", None) if _import_triton() else None
    if knobs is not None:  # triton >= 3.4
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tiles(group: dict) -> tuple[int, int, int, int]:
    """(Q, NB, QP, EP) of a block: the bucket size as the kernel sees it (the whole block
    without error feedback), the element tile (NB buckets of QP slots) and the entry tile
    (EP slots for the m * k window entries)."""
    b = group["topk_block_size"]
    q = group["quant_block_size"] if group["error_feedback"] else b
    entries = group["window_size"] * kept_per_block(b, group["density"])
    return q, _next_pow2(b // q), _next_pow2(q), _next_pow2(entries)


def unsupported_reason(param: torch.Tensor, grad: torch.Tensor, group: dict) -> str | None:
    """Why the kernel does not cover this parameter under ``group``'s settings, or None.

    This checks the configuration only; whether triton is there is
    :func:`unavailable_reason`.
    """
    interpreting = _interpreting()
    if param.device.type == "cpu":
        if not interpreting:
            return (
                "parameters on the CPU (the Triton kernel runs on the CPU only under the "
                "Triton interpreter, TRITON_INTERPRET=1; the CPU has its own fused C++ kernel)"
            )
    elif param.device.type != "cuda":
        return f"parameters on {param.device.type}"
    elif interpreting:
        return "CUDA parameters under TRITON_INTERPRET=1 (the interpreter runs on the host)"
    if type(param.data) is not torch.Tensor:
        return f"parameters of type {type(param.data).__name__}"
    if param.dtype not in SUPPORTED_DTYPES:
        return (
            f"{param.dtype} parameters (it covers float32, bfloat16 and float16; float64 is "
            "left to the pure-PyTorch step)"
        )
    if grad.dtype != param.dtype:
        return f"{grad.dtype} gradients of {param.dtype} parameters"
    if grad.layout != torch.strided or grad.device != param.device:
        return "gradients that are not dense tensors on the parameter's device"
    if group["value_dtype"] not in SUPPORTED_DTYPES:
        return f"value_dtype {group['value_dtype']} (it covers float32, bfloat16, float16)"
    b, q = group["topk_block_size"], group["quant_block_size"]
    if group["error_feedback"]:
        if b % q:
            return (
                f"quant_block_size {q} that does not divide topk_block_size {b} (its buckets "
                "would straddle Top-K blocks)"
            )
        if group["quant_bits"] == 4 and q % 2:
            return f"odd quant_block_size {q} with 4-bit codes (a byte would straddle buckets)"
    entries = group["window_size"] * kept_per_block(b, group["density"])
    if entries > MAX_ENTRY_TILE:
        return (
            f"window_size {group['window_size']} with {kept_per_block(b, group['density'])} "
            f"entries kept per Top-K block ({entries} window entries per block, above "
            f"{MAX_ENTRY_TILE})"
        )
    return None


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _too_many_steps(step: int) -> str:
    return (
        f"MicroAdam: a parameter's step count is {step}; the float32 step counter of its "
        f"state stops being exact at 2^24, so MicroAdam takes at most {_MAX_STEPS} steps "
        "per parameter"
    )


def _blocks_per_program(elements: int, entries: int, blocks: int, interpreted: bool) -> int:
    """Top-K blocks per program, for blocks of ``elements`` padded elements and ``entries``
    padded window entries: about 8192 units of work on a GPU (an entry, with its binary
    searches, costs about two elements), so that small blocks do not leave programs nearly
    idle and large ones do not spill registers; more under the interpreter, where a program
    costs mostly per operation, not per element. Never more than the blocks there are."""
    work = elements + 2 * entries
    target = 1 << 16 if interpreted else 1 << 13
    g = 1 << max(0, (target // work).bit_length() - 1)
    return max(1, min(g, _next_pow2(blocks)))


def _num_warps(elements: int) -> int:
    """Warps for a program with tiles of ``elements`` slots: about 16 slots per thread,
    4 to 16 warps (more than 16 would cap a thread at 64 registers)."""
    return min(16, max(4, _next_pow2(elements) // 512))


def micro_adam_multi_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
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
) -> None:
    """One MicroAdam step of several parameters of one param group, in place.

    Same contract as :func:`microadam.optim.micro_adam.micro_adam_step_` for each
    parameter: states already made by ``MicroAdam._init_state`` (and checked), ``grads``
    only read, finite (the caller checks). The caller checks :func:`unsupported_reason`
    and :func:`unavailable_reason` first. ``step`` (and ``rng_seed``) are read on the host
    from their CPU tensors; nothing waits for the device.
    """
    if not params:
        return
    if not _import_triton():
        raise RuntimeError(f"the Triton MicroAdam step is unavailable ({unavailable_reason()})")
    kernel = _kernel()
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    stochastic = rounding == "stochastic"
    group = {
        "topk_block_size": topk_block_size,
        "quant_block_size": quant_block_size,
        "error_feedback": error_feedback,
        "density": density,
        "window_size": window_size,
    }
    q, nb, qp, ep = _tiles(group)
    k_block = kept_per_block(topk_block_size, density)

    # Everything is checked before anything is written.
    launches: dict[tuple, list] = {}
    targets = []
    for p, g, st in zip(params, grads, states, strict=True):
        t = int(st["step"].item()) + 1  # a CPU tensor: no device sync
        if t > _MAX_STEPS:
            raise RuntimeError(_too_many_steps(t - 1))
        target = p if p.is_contiguous() else p.contiguous()
        targets.append(target)
        if p.numel() == 0:
            continue
        grad = g if g.is_contiguous() else g.contiguous()
        key = noise_key(int(st["rng_seed"].item()), t) if stochastic else 0
        where = (p.device, p.dtype, st["window_values"].dtype, t)
        launches.setdefault(where, []).append((target, grad, st, key))

    for (device, dtype, value_dtype, t), items in launches.items():
        row = (t - 1) % window_size
        rows = min(t, window_size)
        table: list[int] = []
        first = 0
        for target, grad, st, key in items:
            d = target.numel()
            num_full, tail = divmod(d, topk_block_size)
            width = st["window_indices"].shape[1]
            ef = (
                (st["ef_codes"].data_ptr(), st["ef_min"].data_ptr(), st["ef_max"].data_ptr())
                if error_feedback
                else (0, 0, 0)
            )
            table += [
                target.data_ptr(),
                grad.data_ptr(),
                st["window_indices"].data_ptr(),
                st["window_values"].data_ptr(),
                *ef,
                d,
                first,
                width,
                width - num_full * (k_block if num_full else 0),
                key,
            ]
            first += num_full + (1 if tail else 0)
        ages = [(t - 1 - r) % window_size for r in range(rows)]
        decay_offset = len(table)
        assert decay_offset == _FIELDS * len(items)
        table += [_f32_bits(beta1**a) for a in ages]
        table += [_f32_bits(beta2**a) for a in ages]
        meta = torch.tensor(table, dtype=torch.int64)
        if device.type == "cuda":
            meta = meta.pin_memory().to(device, non_blocking=True)
        per_program = _blocks_per_program(nb * qp, ep, first, device.type == "cpu")
        args = (
            meta,
            len(items),
            first,
            decay_offset,
            row,
            rows,
            _f32((1.0 - beta1) / (1.0 - beta1**t)),
            _f32((1.0 - beta2) / (1.0 - beta2**t)),
            _f32(eps),
            _f32(-lr),
            _f32(1.0 - lr * weight_decay),
        )
        consts = dict(
            B=topk_block_size,
            Q=q,
            NB=nb,
            QP=qp,
            K_BLOCK=k_block,
            EP=ep,
            G=per_program,
            SEARCH_T=len(items).bit_length(),
            SEARCH_K=k_block.bit_length(),
            P_DTYPE=_tl_dtype(dtype),
            V_DTYPE=_tl_dtype(value_dtype),
            LEVELS=float((1 << quant_bits) - 1),
            BITS=quant_bits,
            EF=error_feedback,
            STOCHASTIC=stochastic and error_feedback,
            MAXIMIZE=maximize,
            DECAY=weight_decay != 0,
            num_warps=_num_warps(max(nb * qp, ep) * per_program),
            enable_fp_fusion=False,
        )
        launch = kernel[(-(-first // per_program),)]
        if device.type == "cuda":
            with torch.cuda.device(device):
                launch(*args, **consts)
        else:
            launch(*args, **consts)

    for p, target, st in zip(params, targets, states, strict=True):
        if target is not p:
            with torch.no_grad():
                p.copy_(target)
        else:
            _written(p)
        for key in ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max"):
            if key in st:
                _written(st[key])
        st["step"] += 1


def _written(tensor: torch.Tensor) -> None:
    """Bump the version counter, as an in-place torch op would: autograd cannot see the
    kernel's writes through the addresses in its table."""
    torch.autograd.graph.increment_version(tensor)


def _tl_dtype(dtype: torch.dtype) -> Any:
    if dtype == torch.bfloat16:
        return tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


def _kernel() -> Any:
    """The kernel, decorated on first use: ``triton.jit`` decides at decoration whether it
    is interpreted (``TRITON_INTERPRET``), so each mode gets its own."""
    mode = _interpreting()
    if mode not in _kernels:
        _kernels[mode] = triton.jit(_micro_adam_block_kernel)
    return _kernels[mode]


def _micro_adam_block_kernel(
    meta_ptr,
    num_tensors,
    num_blocks,
    decay_offset,
    row,
    rows,
    c1,
    c2,
    eps,
    neg_lr,
    wd_mult,
    B: tl.constexpr,
    Q: tl.constexpr,
    NB: tl.constexpr,
    QP: tl.constexpr,
    K_BLOCK: tl.constexpr,
    EP: tl.constexpr,
    G: tl.constexpr,
    SEARCH_T: tl.constexpr,
    SEARCH_K: tl.constexpr,
    P_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr,
    LEVELS: tl.constexpr,
    BITS: tl.constexpr,
    EF: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,
):
    # G blocks per program. Per-block scalars are (G,) vectors (names end in _g), the
    # block's elements a (G, T) tile, T = NB * QP: NB buckets of Q elements (the whole
    # block when there is no error feedback), each padded to QP slots.
    T: tl.constexpr = NB * QP
    blk = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)
    ok_g = blk < num_blocks
    # Each block's tensor: the last whose first block is <= blk (binary search).
    lo_t = blk * 0
    hi_t = lo_t + num_tensors
    for _ in tl.static_range(SEARCH_T):
        mid_t = (lo_t + hi_t) // 2
        first_mid = tl.load(meta_ptr + mid_t * 12 + 8)
        active_t = hi_t - lo_t > 1
        below = first_mid <= blk
        lo_t, hi_t = (
            tl.where(active_t & below, mid_t, lo_t),
            tl.where(active_t & ~below, mid_t, hi_t),
        )
    info = meta_ptr + lo_t * 12
    p_ptr = tl.load(info + 0).to(tl.pointer_type(P_DTYPE))[:, None]
    g_ptr = tl.load(info + 1).to(tl.pointer_type(P_DTYPE))[:, None]
    wi_ptr = tl.load(info + 2).to(tl.pointer_type(tl.int16))
    wv_ptr = tl.load(info + 3).to(tl.pointer_type(V_DTYPE))
    width_g = tl.load(info + 9)
    jb = blk - tl.load(info + 8)
    start_g = jb * B
    n_g = tl.where(ok_g, tl.minimum(tl.load(info + 7) - start_g, B), 0)
    kb_g = tl.where(ok_g, tl.where(n_g == B, K_BLOCK, tl.load(info + 10)), 0)
    start = start_g[:, None]
    n = n_g[:, None]
    kb = kb_g[:, None]  # entries kept in the block
    width = width_g[:, None]  # the window's row stride
    col0 = (jb * K_BLOCK)[:, None]  # the block's first window column

    f = tl.arange(0, T)[None, :]
    e = (f // QP) * Q + f % QP  # block-local element index
    valid = (f % QP < Q) & (e < n)
    gi = start + e  # index in the tensor
    a = tl.load(g_ptr + gi, mask=valid, other=0.0).to(tl.float32)
    if MAXIMIZE:
        a = -a
    if EF:
        codes_ptr = tl.load(info + 4).to(tl.pointer_type(tl.uint8))[:, None]
        emin_ptr = tl.load(info + 5).to(tl.pointer_type(tl.bfloat16))[:, None]
        emax_ptr = tl.load(info + 6).to(tl.pointer_type(tl.bfloat16))[:, None]
        rb = tl.arange(0, NB)[None, :]
        bucket = start // Q + rb
        bvalid = rb * Q < n
        lo_old = tl.load(emin_ptr + bucket, mask=bvalid, other=0.0).to(tl.float32)
        hi_old = tl.load(emax_ptr + bucket, mask=bvalid, other=0.0).to(tl.float32)
        step_old = tl.math.div_rn(hi_old - lo_old, LEVELS)
        lo_old = tl.reshape(tl.broadcast_to(lo_old[:, :, None], [G, NB, QP]), [G, T])
        step_old = tl.reshape(tl.broadcast_to(step_old[:, :, None], [G, NB, QP]), [G, T])
        if BITS == 4:
            byte = tl.load(codes_ptr + gi // 2, mask=valid, other=0)
            code_old = tl.where(e % 2 == 0, byte >> 4, byte & 15)
        else:
            code_old = tl.load(codes_ptr + gi, mask=valid, other=0)
        a = a + (code_old.to(tl.float32) * step_old + lo_old)
        # Other threads overwrite the codes and ranges just read.
        tl.debug_barrier()

    # Top-K: the kb-th largest |a| bit pattern of each block, bit by bit from the top;
    # then every pattern above it and the first ties in index order. (Reductions and scans
    # name their combine functions: tl.sum and tl.cumsum are jitted wrappers, which the
    # interpreter can only call when TRITON_INTERPRET was set before triton was imported.)
    mag = tl.where(valid, a.to(tl.int32, bitcast=True) & 0x7FFFFFFF, -1)
    thr = tl.full([G, 1], 0, tl.int32)
    for i in tl.static_range(31):
        cand = thr | (1 << (30 - i))
        count = tl.reduce((mag >= cand).to(tl.int32), 1, tl.standard._sum_combine, keep_dims=True)
        thr = tl.where(count >= kb, cand, thr)
    above = mag > thr
    tie = (mag == thr).to(tl.int32)
    room = kb - tl.reduce(above.to(tl.int32), 1, tl.standard._sum_combine, keep_dims=True)
    keep = above | ((tie == 1) & (tl.associative_scan(tie, 1, tl.standard._sum_combine) <= room))
    # Row (t - 1) mod m of the window: the kept indices, ascending, with a at them.
    rank = tl.associative_scan(keep.to(tl.int32), 1, tl.standard._sum_combine)
    slot = row * width + col0 + rank - 1
    tl.store(wi_ptr[:, None] + slot, e.to(tl.int16), mask=keep)
    # Stored saturated at value_dtype's largest finite value (compress.window.saturating_cast):
    # 3.3895313892515355e38 is bf16's (0x7F7F), 65504 float16's.
    if V_DTYPE == tl.bfloat16:
        kept = tl.minimum(tl.maximum(a, -3.3895313892515355e38), 3.3895313892515355e38)
        bits = kept.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif V_DTYPE == tl.float16:
        value = tl.minimum(tl.maximum(a, -65504.0), 65504.0).to(tl.float16)
    else:
        value = a.to(V_DTYPE)
    tl.store(wv_ptr[:, None] + slot, value, mask=keep)

    if EF:
        # The error is what Top-K dropped, quantized per bucket.
        err = tl.where(keep, 0.0, a)
        err3 = tl.reshape(err, [G, NB, QP])
        valid3 = tl.reshape(valid, [G, NB, QP])
        lo_bits = tl.reduce(
            tl.where(valid3, err3, float("inf")), 2, tl.standard._elementwise_min
        ).to(tl.uint32, bitcast=True)
        hi_bits = tl.reduce(
            tl.where(valid3, err3, float("-inf")), 2, tl.standard._elementwise_max
        ).to(tl.uint32, bitcast=True)
        lo_bits = (lo_bits + (0x7FFF + ((lo_bits >> 16) & 1))) & 0xFFFF0000
        hi_bits = (hi_bits + (0x7FFF + ((hi_bits >> 16) & 1))) & 0xFFFF0000
        lo_new = lo_bits.to(tl.float32, bitcast=True)
        hi_new = hi_bits.to(tl.float32, bitcast=True)
        tl.store(emin_ptr + bucket, lo_new.to(tl.bfloat16), mask=bvalid)
        tl.store(emax_ptr + bucket, hi_new.to(tl.bfloat16), mask=bvalid)
        step_new = tl.math.div_rn(hi_new - lo_new, LEVELS)
        lo_new = tl.reshape(tl.broadcast_to(lo_new[:, :, None], [G, NB, QP]), [G, T])
        step_new = tl.reshape(tl.broadcast_to(step_new[:, :, None], [G, NB, QP]), [G, T])
        nonzero = step_new > 0
        scaled = tl.math.div_rn(err - lo_new, tl.where(nonzero, step_new, 1.0))
        if STOCHASTIC:
            # uniform_noise: mix32(mix32(i_lo ^ key) ^ i_hi) >> 8, times 2^-24.
            key = tl.load(info + 11).to(tl.uint32)[:, None]
            h = (gi & 0xFFFFFFFF).to(tl.uint32) ^ key
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            h = h ^ (gi >> 32).to(tl.uint32)
            h = h ^ (h >> 16)
            h = h * 0x7FEB352D
            h = h ^ (h >> 15)
            h = h * 0x846CA68B
            h = h ^ (h >> 16)
            scaled = scaled + (h >> 8).to(tl.float32) * 5.9604644775390625e-08
        else:
            scaled = scaled + 0.5
        scaled = tl.minimum(tl.maximum(scaled, 0.0), LEVELS)
        code = tl.where(nonzero & valid, scaled, 0.0).to(tl.int32)
        if BITS == 4:
            # Q is even: the pairs (2c, 2c + 1) of the flat tile never straddle buckets.
            high, low = tl.split(tl.reshape(code, [G, T // 2, 2]))
            fp = tl.arange(0, T // 2)[None, :] * 2
            ep = (fp // QP) * Q + fp % QP
            tl.store(
                codes_ptr + (start + ep) // 2,
                ((high << 4) | low).to(tl.uint8),
                mask=(fp % QP < Q) & (ep < n),
            )
        else:
            tl.store(codes_ptr + gi, code.to(tl.uint8), mask=valid)

    # The moments of the block's window entries (the new row included), from the rows
    # written so far in storage order: entry f is column c = f mod K_BLOCK of row
    # r = f div K_BLOCK, at col0 + c of that row; each finds its coordinate in every row
    # by binary search (the rows of a block are sorted).
    tl.debug_barrier()
    fe = tl.arange(0, EP)[None, :]
    er = fe // K_BLOCK
    ec = fe % K_BLOCK
    wi = wi_ptr[:, None]
    wv = wv_ptr[:, None]
    live = (er < rows) & (ec < kb)
    target = tl.load(wi + (er * width + col0 + ec), mask=live, other=0).to(tl.int32)
    live = live & (target >= 0) & (target < n)  # a sound state has no others
    m1 = tl.full([G, EP], 0.0, tl.float32)
    m2 = tl.full([G, EP], 0.0, tl.float32)
    for s in range(rows):
        d1 = tl.load(meta_ptr + decay_offset + s).to(tl.int32).to(tl.float32, bitcast=True)
        d2 = tl.load(meta_ptr + decay_offset + rows + s).to(tl.int32)
        d2 = d2.to(tl.float32, bitcast=True)
        base = s * width + col0
        lo = tl.full([G, EP], 0, tl.int32)
        hi = lo + kb
        for _ in tl.static_range(SEARCH_K):
            mid = (lo + hi) >> 1
            active = lo < hi
            x = tl.load(wi + (base + mid), mask=live & active, other=0).to(tl.int32)
            right = x < target
            lo, hi = tl.where(active & right, mid + 1, lo), tl.where(active & ~right, mid, hi)
        inside = live & (lo < kb)
        x = tl.load(wi + (base + lo), mask=inside, other=-1).to(tl.int32)
        found = inside & (x == target)
        v = tl.load(wv + (base + lo), mask=found, other=0.0).to(tl.float32)
        m1 = tl.where(found, m1 + v * d1, m1)
        m2 = tl.where(found, m2 + (v * v) * d2, m2)
    denom = tl.math.sqrt_rn(m2 * c2) + eps
    positive = denom > 0
    u = tl.where(positive, tl.math.div_rn(m1 * c1, tl.where(positive, denom, 1.0)), 0.0)
    at = start + target
    old = tl.load(p_ptr + at, mask=live, other=0.0).to(tl.float32)
    if DECAY:
        old = old * wd_mult
    new = tl.fma(u, neg_lr, old)  # torch's add_(u, alpha=-lr) is one fma
    # Every entry is read before any parameter of the block is written.
    tl.debug_barrier()
    if DECAY:
        dense = tl.load(p_ptr + gi, mask=valid, other=0.0).to(tl.float32) * wd_mult
        if P_DTYPE == tl.bfloat16:
            bits = dense.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            dense = bits.to(tl.float32, bitcast=True)
        tl.store(p_ptr + gi, dense.to(P_DTYPE), mask=valid)
        tl.debug_barrier()
    if P_DTYPE == tl.bfloat16:
        bits = new.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        new = bits.to(tl.float32, bitcast=True)
    tl.store(p_ptr + at, new.to(P_DTYPE), mask=live)
