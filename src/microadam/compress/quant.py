"""Bucket quantization of MicroAdam's error-feedback buffer (Alg. 1, lines 7-8).

A flat tensor is cut into consecutive buckets of ``bucket_size`` elements (the last may be
shorter). Each bucket keeps its range as bfloat16 ``lo = bf16(min x)`` and
``hi = bf16(max x)``; the rounded values are used both to quantize and to dequantize, so
the two always agree. With ``L = 2**bits - 1`` levels and step ``u = (hi - lo) / L``:

    nearest:     code = clamp(floor((x - lo) / u + 1/2), 0, L)
    stochastic:  code = clamp(floor((x - lo) / u + xi), 0, L),  xi ~ U[0, 1)
    decode:      x' = code * u + lo

A bucket with ``u == 0`` (constant, or a range that rounds to one bf16 value) gets code 0
everywhere and decodes to ``lo``: no division by zero. The clamp matters because bf16
rounding can move ``lo`` above the true minimum or ``hi`` below the true maximum.

Codes of 4 bits are packed two to a byte, the even element in the high nibble; an odd
length leaves the last low nibble zero.

Stochastic rounding draws ``xi`` from a counter-based generator (:func:`uniform_noise`): the
noise of element ``i`` at step ``t`` is a fixed hash of ``(seed, t, i)``. It does not depend
on how the tensor is chunked, on the device, or on what else drew random numbers, so the
pure path, the fused kernels and a resumed run all see the same stream, and the whole
generator state is one integer seed plus the step counter.
"""

from __future__ import annotations

import torch

__all__ = [
    "bucket_range",
    "code_levels",
    "decode",
    "dequantize",
    "encode",
    "expand_buckets",
    "mix32",
    "pack_nibbles",
    "packed_numel",
    "quantize",
    "uniform_noise",
    "unpack_nibbles",
]

_MASK32 = 0xFFFFFFFF


def code_levels(bits: int) -> int:
    """The largest code, ``2**bits - 1``."""
    return (1 << bits) - 1


def packed_numel(numel: int, bits: int) -> int:
    """Bytes of packed codes for ``numel`` elements: ceil(numel / 2) at 4 bits, else numel."""
    return (numel + 1) // 2 if bits == 4 else numel


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values 0..15) two per byte, the even element in the high nibble."""
    n = codes.numel()
    if n % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` 4-bit codes as uint8."""
    out = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1)
    return out[:numel]


def expand_buckets(
    per_bucket: torch.Tensor, start: int, length: int, bucket_size: int
) -> torch.Tensor:
    """Per-element copy of ``per_bucket`` for elements ``start .. start + length - 1``.

    Element ``i`` belongs to bucket ``i // bucket_size``; the range need not start or end on
    a bucket boundary, so chunked callers can walk any tensor in pieces of any size.
    """
    if length == 0:
        return per_bucket[:0]
    b0, b1 = start // bucket_size, (start + length - 1) // bucket_size
    if start % bucket_size == 0:
        return per_bucket[b0 : b1 + 1].repeat_interleave(bucket_size)[:length]
    edges = torch.arange(b0, b1 + 2, device=per_bucket.device) * bucket_size
    counts = edges.clamp(start, start + length).diff()
    return per_bucket[b0 : b1 + 1].repeat_interleave(counts, output_size=length)


def bucket_range(x: torch.Tensor, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: bf16-rounded min and max of every bucket of the 1-D tensor ``x``.

    ``x`` starts on a bucket boundary; the last bucket may be shorter.
    """
    n = x.numel()
    full, tail = divmod(n, bucket_size)
    lo_parts, hi_parts = [], []
    if full:
        view = x[: full * bucket_size].view(full, bucket_size)
        lo_parts.append(view.amin(dim=1))
        hi_parts.append(view.amax(dim=1))
    if tail:
        rest = x[full * bucket_size :]
        lo_parts.append(rest.amin().view(1))
        hi_parts.append(rest.amax().view(1))
    if not lo_parts:
        empty = x.new_empty(0, dtype=torch.bfloat16)
        return empty, empty
    return torch.cat(lo_parts).to(torch.bfloat16), torch.cat(hi_parts).to(torch.bfloat16)


def encode(
    x: torch.Tensor,
    lo: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes (uint8, unpacked) of ``x`` given per-element ``lo`` and ``step = (hi - lo) / L``.

    ``noise`` (same shape as ``x``, values in [0, 1)) selects stochastic rounding; ``None``
    rounds to nearest. Elements with ``step == 0`` get code 0.
    """
    scaled = (x - lo) / step
    scaled = scaled + (0.5 if noise is None else noise)
    # floor, then clamp to [0, L], equals clamping first and then truncating toward zero,
    # which the conversion to uint8 does (and torch's CPU floor is an MKL call that splits
    # even small tensors across threads).
    codes = scaled.clamp_(0, code_levels(bits))
    codes = torch.where(step > 0, codes, 0.0)
    return codes.to(torch.uint8)


def decode(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes * step + lo`` in the dtype of ``lo`` and ``step``."""
    return codes.to(step.dtype) * step + lo


def _steps(lo: torch.Tensor, hi: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return (hi.to(dtype) - lo.to(dtype)) / code_levels(bits)


def _bucketed(x: torch.Tensor, bucket_size: int) -> list[torch.Tensor]:
    """Views of a 1-D tensor as (full buckets, bucket_size) and (1, tail), skipping empties."""
    full, tail = divmod(x.numel(), bucket_size)
    parts = []
    if full:
        parts.append(x[: full * bucket_size].view(full, bucket_size))
    if tail:
        parts.append(x[full * bucket_size :].view(1, tail))
    return parts


def quantize(
    x: torch.Tensor,
    bucket_size: int,
    bits: int,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the 1-D tensor ``x`` bucket by bucket.

    Returns ``(codes, lo, hi)``: packed uint8 codes (:func:`packed_numel` bytes) and the
    bf16 range of each bucket. ``noise`` as in :func:`encode`.
    """
    if bits not in (4, 8):
        raise ValueError(f"Invalid bits: {bits} (expected 4 or 8)")
    lo, hi = bucket_range(x, bucket_size)
    lo_x, step_x = lo.to(x.dtype).unsqueeze(1), _steps(lo, hi, bits, x.dtype).unsqueeze(1)
    noise_parts = _bucketed(noise, bucket_size) if noise is not None else None
    codes, b = [], 0
    for i, part in enumerate(_bucketed(x, bucket_size)):
        nb = part.shape[0]
        np_ = noise_parts[i] if noise_parts is not None else None
        codes.append(encode(part, lo_x[b : b + nb], step_x[b : b + nb], bits, np_).view(-1))
        b += nb
    flat = torch.cat(codes) if codes else x.new_empty(0, dtype=torch.uint8)
    return (pack_nibbles(flat) if bits == 4 else flat), lo, hi


def dequantize(
    codes: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    numel: int,
    bucket_size: int,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize` up to the quantization error, in ``dtype``."""
    raw = unpack_nibbles(codes, numel) if bits == 4 else codes[:numel]
    lo_x, step_x = lo.to(dtype).unsqueeze(1), _steps(lo, hi, bits, dtype).unsqueeze(1)
    out, b = [], 0
    for part in _bucketed(raw, bucket_size):
        nb = part.shape[0]
        out.append(decode(part, lo_x[b : b + nb], step_x[b : b + nb]).view(-1))
        b += nb
    return torch.cat(out) if out else torch.empty(0, dtype=dtype, device=codes.device)


def mix32(x):
    """A 32-bit integer finalizer (xor-shift-multiply), on Python ints or int64 tensors.

    Multiplications are split into 16-bit halves so int64 tensor arithmetic never
    overflows; the result is the same on every device and in the C++ kernels.
    """

    def mul32(v, c):
        lo = (v & 0xFFFF) * c
        hi = (((v >> 16) * c) & 0xFFFF) << 16
        return (lo + hi) & _MASK32

    x = x & _MASK32
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_key(seed: int, step: int) -> int:
    """The 32-bit key of step ``step`` of a stream seeded with ``seed``."""
    return mix32((seed & _MASK32) ^ mix32(((seed >> 32) + step * 0x9E3779B9) & _MASK32))


def uniform_noise(
    seed: int,
    step: int,
    start: int,
    length: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24-bit resolution) for elements ``start .. start+length-1``.

    Element ``i`` gets ``mix32(mix32(i_lo ^ key) ^ i_hi) / 2**32`` truncated to 24 bits,
    with ``key = noise_key(seed, step)``: a pure function of ``(seed, step, i)``.
    """
    key = noise_key(seed, step)
    i = torch.arange(start, start + length, device=device, dtype=torch.int64)
    h = mix32((i & _MASK32) ^ key)
    h = mix32(h ^ (i >> 32))
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))
