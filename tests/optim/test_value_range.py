"""Window values beyond ``value_dtype``'s range saturate instead of overflowing.

Gradients of 1e4 are finite in float16, but error feedback accumulates what Top-K drops,
so the corrected gradient soon exceeds float16's largest value (65504): stored as it was,
it became inf in the window and NaN in the parameters. Every path stores it saturated.
"""

from __future__ import annotations

import pytest
import torch

from microadam import MicroAdam
from microadam.compress.window import saturating_cast
from microadam.kernels import micro_adam_cpu

PATHS = [
    pytest.param("eager", id="eager"),
    pytest.param("compiled", id="compiled"),
    pytest.param(
        "cpu",
        id="cpu",
        marks=[
            pytest.mark.skipif(
                micro_adam_cpu.unavailable_reason() is not None, reason="no fused CPU kernel"
            ),
            # Known defect, open in issue #15: the fused C++ kernel still casts the window
            # values without saturating (its rewrite was in progress).
            pytest.mark.xfail(strict=True, reason="the fused CPU kernel does not saturate yet"),
        ],
    ),
]


def test_saturating_cast():
    x = torch.tensor([-1e6, -65504.0, 1.5, 65519.0, 7e4, 3.4e38])
    got = saturating_cast(x, torch.float16)
    assert got.tolist() == [-65504.0, -65504.0, 1.5, 65504.0, 65504.0, 65504.0]
    top_bf16 = torch.finfo(torch.bfloat16).max
    near_max = torch.tensor([torch.finfo(torch.float32).max, -3.3e38])
    assert saturating_cast(near_max, torch.bfloat16).tolist() == [
        top_bf16,
        torch.tensor(-3.3e38).to(torch.bfloat16).item(),
    ]
    assert torch.isinf(near_max.to(torch.bfloat16)[0])  # what a plain cast does
    # In range, exactly Tensor.to.
    y = torch.randn(1000) * 1e3
    assert torch.equal(saturating_cast(y, torch.float16), y.to(torch.float16))


@pytest.mark.parametrize("path", PATHS)
def test_float16_window_with_large_gradients_stays_finite(path):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = MicroAdam([p], lr=1e-3, value_dtype=torch.float16, fused=path)
    for _ in range(12):
        p.grad = 1e4 * (1 + torch.rand(4096, generator=gen))  # finite, same sign
        opt.step()
    values = opt.state[p]["window_values"]
    assert bool(torch.isfinite(p).all())
    assert bool(torch.isfinite(values).all())
    assert values.float().abs().max().item() == 65504.0  # the saturation was reached
    # The update still descends: every coordinate moved against its positive gradient.
    assert bool((p < 0).any()) and bool((p <= 0).all())
