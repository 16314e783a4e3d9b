"""Bucket quantization, 4-bit packing and the counter-based noise of stochastic rounding."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microadam.compress import (
    bucket_range,
    dequantize,
    expand_buckets,
    pack_nibbles,
    packed_numel,
    quantize,
    uniform_noise,
    unpack_nibbles,
)
from microadam.compress.quant import mix32

sizes = st.integers(1, 2000)
buckets = st.integers(1, 300)
bits_st = st.sampled_from([4, 8])


@settings(max_examples=80, deadline=None)
@given(n=sizes, q=buckets, bits=bits_st, scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31))
def test_nearest_error_within_half_step(n, q, bits, scale, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    codes, lo, hi = quantize(x, q, bits)
    assert codes.dtype == torch.uint8 and codes.numel() == packed_numel(n, bits)
    y = dequantize(codes, lo, hi, n, q, bits)
    levels = 2**bits - 1
    for b in range(lo.numel()):
        seg = slice(b * q, (b + 1) * q)
        lo_b, hi_b = lo[b].float(), hi[b].float()
        step = (hi_b - lo_b) / levels
        # Inside the stored (bf16) range the error is at most half a step; elements that
        # bf16 rounding left outside [lo, hi] are clamped to the nearest end.
        inside = x[seg].clamp(lo_b, hi_b)
        err = (y[seg] - inside).abs().max()
        rounding = 4 * 2**-24 * max(lo_b.abs(), hi_b.abs())  # float32 arithmetic of decode
        assert err <= step / 2 + rounding + 1e-30
        outside = (x[seg] - inside).abs().max()
        assert outside <= (x[seg].abs().max() * 2**-8) + 1e-30  # bf16 rounding of min/max


@settings(max_examples=40, deadline=None)
@given(n=sizes, q=buckets, bits=bits_st, value=st.floats(-1e30, 1e30))
def test_constant_buckets_round_trip_without_nan(n, q, bits, value):
    x = torch.full((n,), value)
    codes, lo, hi = quantize(x, q, bits)
    y = dequantize(codes, lo, hi, n, q, bits)
    assert torch.isfinite(y).all()
    assert torch.all(codes == 0)
    assert torch.equal(y, torch.full((n,), value).bfloat16().float())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 999), seed=st.integers(0, 2**31))
def test_nibble_packing_is_a_bijection(n, seed):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )
    packed = pack_nibbles(codes)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_nibbles(packed, n), codes)
    if n % 2:
        assert int(packed[-1]) & 0x0F == 0  # odd length: the last low nibble is padding
    if n >= 2:
        assert int(packed[0]) == (int(codes[0]) << 4) | int(codes[1])  # even element high


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 500), length=st.integers(0, 500), q=buckets)
def test_expand_buckets_matches_integer_division(start, length, q):
    per_bucket = torch.arange((start + length) // q + 2, dtype=torch.float64)
    out = expand_buckets(per_bucket, start, length, q)
    expected = (torch.arange(start, start + length) // q).double()
    assert torch.equal(out, expected)


def test_stochastic_rounding_is_unbiased():
    # x sits at 30% between two levels: stochastic rounding must round up ~30% of the time.
    n, q = 200_000, 1000
    x = torch.zeros(n)
    x[::q] = 15.0  # each bucket spans [0, 15]: step 1
    x[1::2] = 7.3
    noise = uniform_noise(seed=1234, step=1, start=0, length=n)
    codes, lo, hi = quantize(x, q, 4, noise=noise)
    y = dequantize(codes, lo, hi, n, q, 4)
    mean = y[1::2].mean().item()
    assert abs(mean - 7.3) < 0.01
    nearest = dequantize(*quantize(x, q, 4), n, q, 4)
    assert torch.all(nearest[1::2] == 7.0)


def test_noise_is_a_pure_function_of_seed_step_and_index():
    full = uniform_noise(7, 3, 0, 10_000)
    assert torch.equal(
        torch.cat([uniform_noise(7, 3, 0, 4321), uniform_noise(7, 3, 4321, 5679)]), full
    )
    assert not torch.equal(uniform_noise(7, 4, 0, 10_000), full)
    assert not torch.equal(uniform_noise(8, 3, 0, 10_000), full)
    assert 0.0 <= full.min() and full.max() < 1.0
    assert abs(full.mean().item() - 0.5) < 0.01
    # The integer hash on tensors equals the same hash on Python ints.
    xs = [0, 1, 2**31, 2**32 - 1, 123456789]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(v) for v in xs]


def test_bucket_range_rounds_to_bf16():
    x = torch.tensor([1.001, 2.0, -3.0001, 7.0, 0.5])
    lo, hi = bucket_range(x, 3)
    assert lo.dtype == torch.bfloat16
    assert lo.tolist() == [torch.tensor(-3.0001).bfloat16().item(), 0.5]
    assert hi.tolist() == [2.0, 7.0]
