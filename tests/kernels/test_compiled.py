"""The compiled step (``fused="compiled"``) against the pure-PyTorch step.

On the CPU inductor compiles the chunk step to C++, so this runs here what a GPU runs
through Triton. Two optimizers get identical gradients; after every one of 12 steps the
whole state must be bit-identical (window indices and values, packed codes, bf16 bucket
ranges, step, seed) and the parameters equal up to the rounding of the update (the pure
step's ``add_(u, alpha=-lr)`` is a fused multiply-add where torch vectorizes it). The
compiled function must trace without a graph break (``fullgraph=True`` would raise) and
compile nothing after the first step: every later step runs with
``error_on_recompile``. Chunks are shrunk to 1024 elements, so every tensor below spans
several chunks and a shorter last one, and the 0-d and tiny tensors are chunks of their own.

Each distinct (chunk length, setting) compiles once: a few seconds each, from inductor's
on-disk cache after the first run on a machine.
"""

from __future__ import annotations

import pytest
import torch

import microadam.optim.micro_adam as micro_adam_module
from kernels.test_fused_cpu import assert_same_state, make_grad, ulp_distance
from microadam import MicroAdam
from microadam.kernels import micro_adam_compiled as compiled

STEPS = 12
CHUNK = 1024

BASE = dict(
    lr=1e-2,
    density=0.05,
    topk_block_size=128,
    quant_block_size=32,
    window_size=4,  # steps 5..12 overwrite old rows
)

CASES = {
    # float32 with a 2-D tensor (1073 elements: a chunk and a 49-element tail with a short
    # Top-K block and a short bucket), a 0-d and a 5-element tensor.
    "f32-nearest-4bit-wd": (
        torch.float32,
        [(3000,), (37, 29), (), (5,)],
        dict(weight_decay=0.1),
    ),
    # The default layout (B = 4096, Q = 256, 1%): chunks of one block, and the 4224- and
    # 8292-element tensors end in a short block (inductor once lost the second half of a
    # concatenation of a full block's and a short block's indices here).
    "f32-default-layout": (
        torch.float32,
        [(4224,), (2, 4146)],
        dict(density=0.01, topk_block_size=4096, quant_block_size=256),
    ),
    "bf16-stochastic-4bit": (torch.bfloat16, [(1500,), ()], dict(rounding="stochastic")),
    "f16-f16-values-8bit-maximize": (
        torch.float16,
        [(1500,), (7,)],
        dict(value_dtype=torch.float16, quant_bits=8, maximize=True),
    ),
    "f32-stochastic-8bit-f32-values": (
        torch.float32,
        [(1500,), (3,)],
        dict(rounding="stochastic", quant_bits=8, value_dtype=torch.float32, eps=0.0),
    ),
    "f32-no-error-feedback-tensor-lr": (
        torch.float32,
        [(2100,)],
        dict(error_feedback=False, lr=torch.tensor(3e-3), betas=(0.8, 0.99)),
    ),
}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(micro_adam_module, "DEFAULT_CHUNK_SIZE", CHUNK)
    torch._dynamo.reset()  # each case counts its own graphs
    yield
    torch._dynamo.reset()


def _assert_params_close(got: torch.Tensor, expected: torch.Tensor, where: str) -> None:
    got, expected = got.detach(), expected.detach()
    if got.dtype == torch.float32:
        # A few float32 roundings of the update apart: an absolute bound, since near zero
        # a rounding of lr * u is many ulps of the parameter.
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        assert float((got - expected).abs().max()) <= 1e-6 * scale, where
    else:
        assert ulp_distance(got, expected) <= 1, where


@pytest.mark.skipif(
    compiled.unavailable_reason() is not None, reason=str(compiled.unavailable_reason())
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_step_matches_pure_step(name, small_chunks):
    dtype, shapes, overrides = CASES[name]
    hyper = {**BASE, **overrides}
    gen = torch.Generator().manual_seed(0)
    x0 = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    pure = [torch.nn.Parameter(x.clone()) for x in x0]
    comp = [torch.nn.Parameter(x.clone()) for x in x0]
    opt_pure = MicroAdam(pure, fused=False, **hyper)
    opt_comp = MicroAdam(comp, fused="compiled", **hyper)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step in range(1, STEPS + 1):
        grads = [make_grad(s, dtype, hyper["topk_block_size"], gen) for s in shapes]
        for params, opt in ((pure, opt_pure), (comp, opt_comp)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            torch.manual_seed(step)  # the same rounding seeds, drawn at the first step
            if opt is opt_comp and step > 1:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    opt.step()
            else:
                opt.step()
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1  # the chunks really ran compiled
        for i, (p, q) in enumerate(zip(pure, comp, strict=True)):
            where = f"{name}, step {step}, param {i} {tuple(p.shape)}"
            assert_same_state(opt_comp.state[q], opt_pure.state[p], where)
            _assert_params_close(q, p, where)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


@pytest.mark.skipif(
    compiled.unavailable_reason() is not None, reason=str(compiled.unavailable_reason())
)
def test_compiled_step_counts_one_graph_per_chunk_length(small_chunks):
    """All full chunks of all tensors share a graph; each shorter last chunk adds one."""
    shapes = [(2 * CHUNK,), (3 * CHUNK,), (CHUNK + 100,)]  # chunk lengths: 1024 and 100
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = MicroAdam(params, fused="compiled", **BASE)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_step_needs_one_pass_quantization():
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    group = dict(MicroAdam([p]).defaults, topk_block_size=29056, quant_block_size=100000)
    reason = compiled.unsupported_reason(p, p.grad, group)
    assert reason is not None and "two-pass" in reason
    opt = MicroAdam([p], fused="compiled", topk_block_size=29056, quant_block_size=100000)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"MicroAdam\(fused='compiled'\): the compiled step"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state[p]) == 0
    # fused=None on the CPU never picks the compiled step: this steps.
    MicroAdam([p], fused=None, topk_block_size=29056, quant_block_size=100000).step()
    assert not torch.equal(p, before)
