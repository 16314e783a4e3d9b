"""The Triton kernel of MicroAdam against the pure-PyTorch step, under the Triton interpreter.

The kernel (``microadam.kernels.micro_adam_triton``) runs on CPU tensors when
``TRITON_INTERPRET=1``. Triton reads that variable when a function is decorated with
``triton.jit``, not when triton is imported, and the module decorates its kernel on first
use, once per mode; so each test sets the variable (``monkeypatch``) and the rest of the
suite, in the same process, never sees it.

Two copies of the parameters get identical gradients: one steps with
``MicroAdam(fused=False)``, the other through ``micro_adam_multi_step_`` on states made by
``MicroAdam._init_state``. After every step the whole state must be bit-identical (window
indices and values, packed codes, bf16 bucket ranges, step, seed) and the parameters within
2 ulp. Gradients are tie-free (low-precision ones have distinct magnitudes in every block)
and the pure path's Top-K is watched for ties, as in ``test_fused_cpu``. Blocks are small:
the interpreter costs about a millisecond per operation of a program.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys

import pytest
import torch

pytest.importorskip("triton")

import microadam.optim.micro_adam as micro_adam_module
from kernels.test_fused_cpu import (
    TieWatch,
    assert_same_state,
    make_grad,
    ulp_distance,
)
from microadam import MicroAdam
from microadam.kernels import micro_adam_triton as kernel

STEPS = 12
BASE = dict(
    lr=1e-2,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    window_size=4,  # 12 steps wrap the window twice
    density=0.1,
    topk_block_size=64,
    quant_block_size=16,
    quant_bits=4,
    error_feedback=True,
    rounding="nearest",
    value_dtype=torch.bfloat16,
    maximize=False,
)
# The group settings micro_adam_multi_step_ takes (value_dtype comes with the state):
# those every path's step function takes.
SETTINGS = ("lr", *micro_adam_module._STEP_ARGUMENTS)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


def run_case(
    monkeypatch,
    shapes,
    dtype=torch.float32,
    *,
    steps=STEPS,
    skip_every=None,
    transpose=(),
    seed=0,
    **overrides,
) -> int:
    """Steps both paths on the same gradients, comparing after every step; returns the
    largest parameter difference seen, in ulp. ``skip_every[i] = n``: parameter ``i`` has
    no gradient at the steps divisible by n (so it falls behind the others)."""
    hyper = {**BASE, **overrides}
    skip_every = skip_every or {}
    gen = torch.Generator().manual_seed(1234 + seed)
    inits = []
    for i, shape in enumerate(shapes):
        init = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        inits.append(init.t().contiguous().t() if i in transpose else init)
    pure_params = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in inits]
    params = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in inits]
    pure = MicroAdam(pure_params, fused=False, **hyper)
    holder = MicroAdam(params, fused=False, **hyper)  # makes and checks states; never steps
    group = holder.param_groups[0]
    settings = {key: group[key] for key in SETTINGS}
    ties = TieWatch(monkeypatch)
    worst = 0
    for t in range(1, steps + 1):
        grads = []
        for i, p in enumerate(params):
            every = skip_every.get(i)
            skip = every is not None and t % every == 0
            grads.append(None if skip else make_grad(p.shape, dtype, hyper["topk_block_size"], gen))
        for pp, p, grad in zip(pure_params, params, grads, strict=True):
            pp.grad = None if grad is None else grad.clone()
            p.grad = None if grad is None else grad.clone()
        torch.manual_seed(t)  # stochastic rounding seeds are drawn at a parameter's first step
        pure.step()
        torch.manual_seed(t)
        stepped = [p for p in params if p.grad is not None]
        states = [holder._init_state(p, group) for p in stepped]
        for p in stepped:
            assert kernel.unsupported_reason(p, p.grad, group) is None
        kernel.micro_adam_multi_step_(stepped, [p.grad for p in stepped], states, **settings)
        assert ties.ties == 0, f"step {t}: a Top-K tie in the pure path; change the seed"
        for i, (pp, p, grad) in enumerate(zip(pure_params, params, grads, strict=True)):
            where = f"step {t}, param {i} (shape {tuple(p.shape)}, {p.dtype})"
            if grad is not None:
                assert torch.equal(p.grad, grad), f"{where}: p.grad was written"
            assert_same_state(holder.state[p], pure.state[pp], where)
            distance = ulp_distance(p, pp)
            assert distance <= 2, f"{where}: parameters differ by {distance} ulp"
            worst = max(worst, distance)
    return worst


CASES = {
    # A short tail block (300 = 4 * 64 + 44), a tensor smaller than a block, a 0-d one.
    "f32-tail-tiny-0d": dict(shapes=[(300,), (7,), ()]),
    "f32-odd-numel-stochastic-4bit": dict(shapes=[(301,), (5,)], rounding="stochastic"),
    "f32-values-8bit-stochastic": dict(
        shapes=[(257,)], value_dtype=torch.float32, quant_bits=8, rounding="stochastic"
    ),
    "bf16-params-4bit": dict(shapes=[(130, 3)], dtype=torch.bfloat16, seed=1),
    "bf16-params-f32-values-8bit-wd-stochastic": dict(
        shapes=[(200,)],
        dtype=torch.bfloat16,
        topk_block_size=40,
        quant_block_size=8,
        quant_bits=8,
        value_dtype=torch.float32,
        weight_decay=0.1,
        rounding="stochastic",
        window_size=5,
    ),
    "f16-params-f16-values-maximize-wd": dict(
        shapes=[(250,)],
        dtype=torch.float16,
        value_dtype=torch.float16,
        maximize=True,
        weight_decay=0.05,
    ),
    "8bit-odd-block-odd-bucket": dict(
        shapes=[(200,)], topk_block_size=63, quant_block_size=9, quant_bits=8
    ),
    "no-error-feedback-block-48": dict(shapes=[(300,)], error_feedback=False, topk_block_size=48),
    # Neither size a power of two: both tile dimensions padded.
    "block-60-bucket-12": dict(
        shapes=[(300,)], topk_block_size=60, quant_block_size=12, betas=(0.8, 0.99)
    ),
    "density-1-window-1-eps-0": dict(
        shapes=[(50,)],
        density=1.0,
        topk_block_size=16,
        quant_block_size=8,
        window_size=1,
        eps=0.0,
    ),
    "non-contiguous-param": dict(shapes=[(20, 15)], transpose=(0,), weight_decay=0.01),
    # Several tensors in one launch; the ones without a gradient on some steps fall behind
    # and take launches of their own.
    "many-tensors-grad-skips": dict(
        shapes=[(200,), (64,), (9,), (150,)], skip_every={1: 3, 2: 4}, density=0.05
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_pure(name, interpreter):
    case = dict(CASES[name])
    assert run_case(interpreter, case.pop("shapes"), **case) <= 2


@pytest.mark.parametrize("per_program", [1, 4])
def test_blocks_per_program(per_program, interpreter):
    """The interpreter gives one program all the blocks of a launch; a GPU program takes
    one block of 4096 or a few small ones. With 4, the 15 blocks of these 9 tensors take
    four programs, which mix tensors (the last has a slot to spare); with 1, each block
    finds its tensor among 9 alone."""
    interpreter.setattr(kernel, "_blocks_per_program", lambda *_: per_program)
    shapes = [(200,), (64,), (9,), (), (3,), (70,), (1,), (5, 2), (130,)]
    assert run_case(interpreter, shapes, steps=5, skip_every={1: 3}, rounding="stochastic") <= 2


@pytest.mark.parametrize(
    ("seed", "step"), [(-(2**63), 2.0**24 - 4), (2**63 - 1, 999_999.0), (-1, 0.0)]
)
def test_step_numbers_match_pure_for_any_seed_and_step(seed, step):
    """t, the window row, the decay factors, the bias corrections and the noise key come
    from the state's step and seed, for seeds of any sign and size and steps up to float32's
    last exact integers."""
    hyper = {**BASE, "rounding": "stochastic", "weight_decay": 0.01}
    torch.manual_seed(0)
    x = torch.randn(150)
    p_kernel, p_pure = x.clone(), x.clone()
    opt = MicroAdam([torch.nn.Parameter(x.clone())], **hyper)
    state = opt._init_state(opt.param_groups[0]["params"][0], opt.param_groups[0])
    state["rng_seed"] = torch.tensor(seed, dtype=torch.int64)
    state["step"] = torch.tensor(step, dtype=torch.float32)
    state_pure = copy.deepcopy(state)
    settings = {key: hyper[key] for key in SETTINGS}
    for _ in range(3):
        grad = torch.randn(150)
        kernel.micro_adam_multi_step_([p_kernel], [grad], [state], **settings)
        micro_adam_module.micro_adam_step_(p_pure, grad, state_pure, **settings)
    assert_same_state(state, state_pure, f"seed {seed}, step {step}")
    assert ulp_distance(p_kernel, p_pure) <= 2


def test_ties_keep_the_first_indices():
    """Top-K keeps exactly k per block; among equal magnitudes, the first in index order
    (the pure path may break ties either way, so this is checked on the kernel alone)."""
    hyper = {**BASE, "error_feedback": False, "topk_block_size": 32}
    p = torch.nn.Parameter(torch.zeros(80))
    opt = MicroAdam([p], **hyper)
    state = opt._init_state(p, opt.param_groups[0])
    grad = torch.ones(80)
    grad[35] = -2.0  # one larger magnitude in the second block
    kernel.micro_adam_multi_step_([p], [grad], [state], **{k: hyper[k] for k in SETTINGS})
    # k = 4 per full block, ceil(16 * 0.1) = 2 for the short last block of 16; the second
    # block keeps its index 3 (35 - 32) and the first three ties.
    assert state["window_indices"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert state["window_values"][0].float().tolist() == [1, 1, 1, 1, 1, 1, 1, -2, 1, 1]


def test_a_corrupted_window_index_is_skipped():
    """An index outside its block (only a corrupted state has one) is skipped, never used to
    write outside the parameter; the C++ kernel raises instead, which needs a host read."""
    settings = {key: BASE[key] for key in SETTINGS}
    p = torch.nn.Parameter(torch.randn(128))
    opt = MicroAdam([p], **BASE)
    state = opt._init_state(p, opt.param_groups[0])
    kernel.micro_adam_multi_step_([p], [torch.randn(128)], [state], **settings)
    state["window_indices"][0, 3] = 30000
    state["window_indices"][0, 4] = -5
    kernel.micro_adam_multi_step_([p], [torch.randn(128)], [state], **settings)
    assert torch.isfinite(p).all()


def test_step_count_limit_raises_before_anything_changes():
    settings = {key: BASE[key] for key in SETTINGS}
    p = torch.nn.Parameter(torch.randn(100))
    opt = MicroAdam([p], **BASE)
    state = opt._init_state(p, opt.param_groups[0])
    state["step"].fill_(2.0**24 - 1)
    before = p.detach().clone(), copy.deepcopy(state)
    with pytest.raises(RuntimeError, match=r"step count is 16777215.*at most 16777215 steps"):
        kernel.micro_adam_multi_step_([p], [torch.randn(100)], [state], **settings)
    assert torch.equal(p, before[0])
    assert_same_state(state, before[1], "after the refused step")


# -- what the kernel covers ------------------------------------------------------------


def _group(**overrides):
    return {**BASE, "fused": None, **overrides}


@pytest.mark.parametrize(
    ("param", "grad", "overrides", "reason"),
    [
        (torch.zeros(8, dtype=torch.float64), None, {}, r"torch\.float64 parameters"),
        (torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16), {}, "gradients of torch.float32"),
        (torch.zeros(8), None, {"value_dtype": torch.float64}, "value_dtype torch.float64"),
        (torch.zeros(8), None, {"quant_block_size": 24}, "24 that does not divide .* 64"),
        (
            torch.zeros(8),
            None,
            {"topk_block_size": 63, "quant_block_size": 9},
            "odd quant_block_size 9 with 4-bit codes",
        ),
        (
            torch.zeros(8),
            None,
            {"topk_block_size": 32768, "quant_block_size": 256, "density": 1.0},
            r"131072 window entries per block, above 65536",
        ),
    ],
)
def test_unsupported_reasons(param, grad, overrides, reason):
    grad = torch.zeros_like(param) if grad is None else grad
    got = kernel.unsupported_reason(param, grad, _group(**overrides))
    assert got is not None and re.search(reason, got), got


def test_supported_configurations_have_no_reason():
    for overrides in (
        {},
        {"quant_bits": 8, "topk_block_size": 63, "quant_block_size": 9},
        {"error_feedback": False, "topk_block_size": 63, "quant_block_size": 5},
        {"topk_block_size": 32768, "quant_block_size": 1024, "density": 0.01},
    ):
        for dtype in kernel.SUPPORTED_DTYPES:
            p = torch.zeros(8, dtype=dtype)
            assert kernel.unsupported_reason(p, torch.zeros_like(p), _group(**overrides)) is None


def test_other_devices_are_refused():
    p = torch.zeros(8, device="meta")
    assert kernel.unsupported_reason(p, torch.zeros_like(p), _group()) == "parameters on meta"


def test_cpu_needs_the_interpreter(interpreter):
    interpreter.delenv("TRITON_INTERPRET")
    p = torch.zeros(8)
    reason = kernel.unsupported_reason(p, torch.zeros(8), _group())
    assert reason is not None and "TRITON_INTERPRET=1" in reason and "C++" in reason


def test_without_triton_the_module_imports_and_says_why(interpreter):
    interpreter.setitem(sys.modules, "triton", None)  # "import triton" now fails
    interpreter.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_kernel_copy", kernel.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # a fresh copy: the real module keeps its triton
    assert fresh.unavailable_reason() == "triton is not installed (pip install 'microadam[triton]')"
    p = torch.zeros(8)
    assert fresh.unsupported_reason(p, p, _group()) is None  # TRITON_INTERPRET, from the env
    interpreter.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in fresh.unsupported_reason(p, p, _group())
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.micro_adam_multi_step_([p], [p], [{}], **{k: BASE[k] for k in SETTINGS})
    assert kernel.unavailable_reason() is None


def test_float16_window_values_saturate_as_the_pure_step_does(interpreter):
    """Gradients of 1e4 accumulate past float16's 65504 through error feedback: the kernel
    stores the window values saturated, bit for bit as the pure step does."""
    hyper = {**BASE, "value_dtype": torch.float16}
    gen = torch.Generator().manual_seed(7)
    pure_p = torch.nn.Parameter(torch.zeros(200))
    p = torch.nn.Parameter(torch.zeros(200))
    pure = MicroAdam([pure_p], fused=False, **hyper)
    holder = MicroAdam([p], fused=False, **hyper)
    group = holder.param_groups[0]
    settings = {key: group[key] for key in SETTINGS}
    for t in range(8):
        grad = 1e4 * (1 + torch.rand(200, generator=gen))
        pure_p.grad, p.grad = grad.clone(), grad.clone()
        pure.step()
        state = holder._init_state(p, group)
        kernel.micro_adam_multi_step_([p], [p.grad], [state], **settings)
        assert_same_state(state, pure.state[pure_p], f"step {t + 1}")
        assert ulp_distance(p, pure_p) <= 2
    assert pure.state[pure_p]["window_values"].float().abs().max().item() == 65504.0
    assert bool(torch.isfinite(p).all())
