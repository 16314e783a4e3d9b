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
from microadam.kernels import micro_adam_compiled, micro_adam_cpu

PATHS = [
    pytest.param("eager", id="eager"),
    pytest.param(
        "compiled",
        id="compiled",
        marks=pytest.mark.skipif(
            micro_adam_compiled.unavailable_reason() is not None,
            reason=str(micro_adam_compiled.unavailable_reason()),
        ),
    ),
    pytest.param(
        "cpu",
        id="cpu",
        marks=pytest.mark.skipif(
            micro_adam_cpu.unavailable_reason() is not None, reason="no fused CPU kernel"
        ),
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


@pytest.mark.skipif(micro_adam_cpu.unavailable_reason() is not None, reason="no fused CPU kernel")
def _beyond_float16(gen):
    # Finite float16 gradients whose error feedback soon exceeds float16's range.
    return [1e4 * (1 + torch.rand(4000, generator=gen)) for _ in range(6)]


def _beyond_bfloat16(gen):
    # A first gradient that rounds to inf in bfloat16 but is finite in float32, then
    # ordinary ones. Run without error feedback: the error's bucket range is bfloat16 too,
    # so with it such a gradient is beyond what the step can hold at all.
    first = 3.397e38 + 2.1e31 * torch.randperm(4000, generator=gen).float()  # no ties
    return [first] + [torch.randn(4000, generator=gen) for _ in range(5)]


@pytest.mark.skipif(micro_adam_cpu.unavailable_reason() is not None, reason="no fused CPU kernel")
@pytest.mark.parametrize(
    ("value_dtype", "gradients"),
    [(torch.float16, _beyond_float16), (torch.bfloat16, _beyond_bfloat16)],
    ids=["float16", "bfloat16"],
)
@pytest.mark.parametrize("block", [4096, 100], ids=["vector-loops", "portable-loops"])
def test_fused_kernel_saturates_as_the_pure_step(value_dtype, gradients, block):
    """Saturated window values are bit-identical on the fused CPU kernel and the pure step,
    in its AVX-512 loops (block and bucket sizes multiples of 16) and its portable ones."""
    grads = gradients(torch.Generator().manual_seed(1))
    hyper = dict(value_dtype=value_dtype, topk_block_size=block, quant_block_size=block // 2)
    hyper["error_feedback"] = value_dtype != torch.bfloat16
    states = []
    for path in ("cpu", "eager"):
        p = torch.nn.Parameter(torch.zeros(4000))
        opt = MicroAdam([p], lr=1e-3, fused=path, **hyper)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        states.append((p.detach().clone(), opt.state[p]))
    (p_cpu, s_cpu), (p_eager, s_eager) = states
    assert s_eager["window_values"].float().abs().max().item() == torch.finfo(value_dtype).max
    assert s_cpu.keys() == s_eager.keys()
    for key, value in s_eager.items():
        assert torch.equal(s_cpu[key], value), key
    assert torch.equal(p_cpu, p_eager)
