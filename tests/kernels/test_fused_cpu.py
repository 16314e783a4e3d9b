"""The fused CPU kernel against the pure-PyTorch step, step by step, on the same gradients.

Two optimizers, ``fused=True`` and ``fused=False``, get identical gradients; after every
step their whole state must be identical (window indices and values, packed error codes,
bf16 bucket ranges, step, seed) and their parameters equal to 2 ulp. The kernel rounds
every operation as the pure path does, so in practice the parameters are bit-identical.
Top-K ties could legitimately resolve differently; the pure path's Top-K is watched and a
case whose data ties at a block boundary fails with a request to change its seed.

The kernel is compiled once per machine (cached in torch's extension directory, about
10-20 s the first time); when it cannot be built, these tests are skipped with the
reason, except those that check the fallback itself.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import microadam.optim.micro_adam as micro_adam_module
from microadam import MicroAdam
from microadam.kernels import micro_adam_compiled as compiled_kernel
from microadam.kernels import micro_adam_cpu as kernel
from microadam.optim.micro_adam_state import STATE_LAYOUT
from reference.micro_adam_reference import topk_cut_ties

STEPS = 20


@pytest.fixture
def restore_kernel_state(monkeypatch):
    """Let a test fake a failed or disabled kernel; the loaded one comes back afterwards."""
    for name in ("_ops", "_failure", "_failure_is_error", "_warned"):
        monkeypatch.setattr(kernel, name, getattr(kernel, name))
    return monkeypatch


# -- the comparison table --------------------------------------------------------------


@dataclass
class Case:
    groups: list[dict[str, Any]]  # {"shapes": [...], "dtype": ..., **hyperparameters}
    seed: int = 0
    skip_every: dict[int, int] = field(default_factory=dict)  # param index -> no grad every n
    transpose: tuple[int, ...] = ()  # params made non-contiguous
    threads: int = 1
    fixed_grads: bool = False  # the same gradients at every step


def group(shapes, dtype=torch.float32, **overrides):
    return {"shapes": shapes, "dtype": dtype, **overrides}


BASE = dict(
    lr=1e-2,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    window_size=10,
    density=0.1,
    topk_block_size=128,
    quant_block_size=32,
    quant_bits=4,
    error_feedback=True,
    rounding="nearest",
    value_dtype=torch.bfloat16,
    maximize=False,
)


def _pure_arguments(hyper):
    """The keyword arguments of the pure step (value_dtype comes with the state)."""
    return {k: v for k, v in hyper.items() if k != "value_dtype"}


# Block and bucket sizes that are multiples of 16 take the kernel's AVX-512 loops where the
# CPU has them; the others (and every size on other CPUs) take its portable loops.
CASES = {
    "f32-density1pct-ef4": Case(
        [group([(1000,)], density=0.01, topk_block_size=256, quant_block_size=64)]
    ),
    "f32-density10pct-ef8-odd-bucket": Case([group([(37, 29)], quant_block_size=50, quant_bits=8)]),
    "f32-default-layout-1pct": Case(
        [group([(3, 4096 + 100)], density=0.01, topk_block_size=4096, quant_block_size=256)]
    ),
    "f32-no-error-feedback": Case([group([(1000,)], error_feedback=False)]),
    "f32-no-error-feedback-odd-block": Case(
        [group([(700,)], density=0.01, topk_block_size=300, error_feedback=False)]
    ),
    "small-and-0d-and-empty": Case(
        [group([(7,), (), (3, 4), (64,), (0,)], topk_block_size=64, quant_block_size=16)]
    ),
    "density-0.07": Case([group([(730,)], density=0.07, topk_block_size=100)]),
    "block-1-bucket-1": Case(
        [group([(50,)], topk_block_size=1, quant_block_size=1, betas=(0.0, 0.5))]
    ),
    "bucket-1-8bit": Case([group([(300,)], quant_block_size=1, quant_bits=8)]),
    "block-32768": Case(
        [group([(33000,)], density=0.001, topk_block_size=32768, quant_block_size=1024)]
    ),
    "block-24-bucket-10": Case([group([(501,), (7,)], topk_block_size=24, quant_block_size=10)]),
    "block-64-bucket-24-stochastic": Case(
        [group([(1001,)], topk_block_size=64, quant_block_size=24, rounding="stochastic")]
    ),
    "bucket-larger-than-block": Case(
        [group([(2000,)], topk_block_size=64, quant_block_size=512, density=0.05)]
    ),
    "official-a100-layout": Case(
        [group([(50_000,)], density=0.01, topk_block_size=20864, quant_block_size=256)]
    ),
    "eps-0": Case([group([(400,)], eps=0.0, density=0.01)]),
    "0d-8bit-f32-values": Case(
        [group([(), (5,)], quant_bits=8, value_dtype=torch.float32, density=0.01)]
    ),
    "bf16-params": Case([group([(650,), (5, 7)], torch.bfloat16, topk_block_size=200)], seed=1),
    "bf16-params-fast-layout": Case(
        [group([(1000,)], torch.bfloat16, topk_block_size=128, quant_block_size=32)], seed=3
    ),
    "bf16-params-f32-values-8bit": Case(
        [group([(650,)], torch.bfloat16, value_dtype=torch.float32, quant_bits=8)]
    ),
    "bf16-params-1pct-noef": Case(
        [group([(1000,)], torch.bfloat16, density=0.01, topk_block_size=512, error_feedback=False)]
    ),
    "bf16-params-weight-decay-stochastic": Case(
        [
            group(
                [(999,)],
                torch.bfloat16,
                weight_decay=0.1,
                rounding="stochastic",
                topk_block_size=128,
                quant_block_size=32,
            )
        ],
        seed=3,
    ),
    "f16-params-f16-values": Case([group([(400,)], torch.float16, value_dtype=torch.float16)]),
    "weight-decay": Case([group([(1000,)], weight_decay=0.1, betas=(0.8, 0.99))]),
    "maximize": Case([group([(777,)], maximize=True, weight_decay=0.01)]),
    "stochastic-4bit": Case([group([(1001,), ()], rounding="stochastic")]),
    "stochastic-8bit-odd-bucket": Case(
        [group([(999,)], rounding="stochastic", quant_bits=8, quant_block_size=50)]
    ),
    "window-4-wraps": Case([group([(1000,)], window_size=4, density=0.05)]),
    "window-1": Case([group([(300,)], window_size=1)]),
    "value-dtype-f32": Case([group([(1000,)], value_dtype=torch.float32, window_size=4)]),
    "density-1": Case([group([(300,)], density=1.0, topk_block_size=100, window_size=4)]),
    "two-groups-tensor-lr": Case(
        [
            group(
                [(1000,), (13,)],
                betas=(0.8, 0.99),
                eps=1e-6,
                weight_decay=0.05,
                window_size=4,
                topk_block_size=64,
                quant_block_size=16,
            ),
            group(
                [(2000,)],
                torch.bfloat16,
                lr=3e-3,
                density=0.01,
                topk_block_size=512,
                quant_block_size=100,
                quant_bits=8,
                rounding="stochastic",
                value_dtype=torch.float32,
                maximize=True,
                window_size=6,
            ),
            group([(500,)], lr=torch.tensor(5e-3), error_feedback=False),
        ]
    ),
    "grad-none-skips": Case([group([(300,), (200,)])], skip_every={0: 3, 1: 4}),
    "non-contiguous-param": Case([group([(40, 25)])], transpose=(0,)),
    # Many units on two threads: the kernel's work sharing and its Top-K threshold guesses
    # carried from block to block.
    "two-threads-many-units": Case(
        [group([(300_000,), (5000,)], density=0.01, topk_block_size=1024, quant_block_size=128)],
        threads=2,
    ),
    # A steady gradient: error feedback flattens the top of |a| until the k-th largest
    # moves by a few percent from block to block, so the kernel's candidate thresholds
    # often miss and it retries lower or resamples.
    "two-threads-steady-gradient": Case(
        [group([(250_000,)], density=0.01, topk_block_size=4096, quant_block_size=256)],
        threads=2,
        fixed_grads=True,
    ),
}


def _distinct_magnitudes(numel: int, block: int, dtype: torch.dtype, gen) -> torch.Tensor:
    """Low-precision values whose magnitudes are distinct inside every Top-K block (random
    normals rounded to bf16 would tie at the Top-K boundary): drawn without replacement
    from the representable magnitudes in [2^-4, 2^4), signs at random."""
    lo_bits = torch.tensor(2.0**-4, dtype=dtype).view(torch.int16).item()
    hi_bits = torch.tensor(2.0**4, dtype=dtype).view(torch.int16).item()
    pool = torch.arange(lo_bits, hi_bits, dtype=torch.int16).view(dtype)
    parts = []
    for start in range(0, numel, block):
        n = min(block, numel - start)
        parts.append(pool[torch.randperm(pool.numel(), generator=gen)[:n]])
    sign = torch.randint(0, 2, (numel,), generator=gen).to(dtype) * 2 - 1
    return torch.cat(parts) * sign if parts else torch.empty(0, dtype=dtype)


def make_grad(shape, dtype, block: int, gen) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.randn(shape, generator=gen)
    return _distinct_magnitudes(math.prod(shape), block, dtype, gen).reshape(shape)


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance between x and y in units in the last place of their dtype."""
    if x.numel() == 0:
        return 0
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    ix = x.detach().contiguous().view(bits[x.dtype]).long()
    iy = y.detach().contiguous().view(bits[y.dtype]).long()
    sign = 1 << (8 * x.element_size() - 1)
    # Map sign-magnitude bit patterns to a monotone integer line.
    ix = torch.where(ix < 0, -(ix + sign), ix)
    iy = torch.where(iy < 0, -(iy + sign), iy)
    return int((ix - iy).abs().max())


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bits of a state tensor, to compare floats exactly (NaN and -0 included)."""
    if t.dtype.is_floating_point:
        return t.reshape(-1).view(torch.uint8)
    return t.reshape(-1)


def assert_same_state(fused_state: dict, pure_state: dict, where: str) -> None:
    assert fused_state.keys() == pure_state.keys(), where
    for key, expected in pure_state.items():
        got = fused_state[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{where}: {key}"
        if not torch.equal(_raw(got), _raw(expected)):
            diff = (got.reshape(-1) != expected.reshape(-1)).nonzero().view(-1)
            raise AssertionError(
                f"{where}: {key} differs at {len(diff)} entries, first at {diff[:5].tolist()}"
            )


class TieWatch:
    """Counts Top-K blocks of the pure path whose last kept and first dropped |a| tie."""

    def __init__(self, monkeypatch):
        self.ties = 0
        original = micro_adam_module.block_topk

        def watched(x, block_size, k_block, k_tail):
            self.ties += topk_cut_ties(x, block_size, k_block, k_tail)
            return original(x, block_size, k_block, k_tail)

        monkeypatch.setattr(micro_adam_module, "block_topk", watched)


def build_pair(case: Case):
    gen = torch.Generator().manual_seed(1234 + case.seed)
    fused_groups, pure_groups, params = [], [], []
    for g in case.groups:
        hyper = {k: v for k, v in g.items() if k not in ("shapes", "dtype")}
        fps, pps = [], []
        for shape in g["shapes"]:
            init = torch.randn(shape, generator=gen, dtype=torch.float64).to(g["dtype"])
            if len(params) in case.transpose:
                init = init.t().contiguous().t()
            fps.append(init.clone(memory_format=torch.preserve_format).requires_grad_(True))
            pps.append(init.clone(memory_format=torch.preserve_format).requires_grad_(True))
            params.append((fps[-1], pps[-1], {**BASE, **hyper}))
        fused_groups.append({"params": fps, **hyper})
        pure_groups.append({"params": pps, **copy.deepcopy(hyper)})
    base = {k: v for k, v in BASE.items() if k not in ("lr",)}
    fused = MicroAdam(fused_groups, lr=BASE["lr"], fused=True, **base)
    pure = MicroAdam(pure_groups, lr=BASE["lr"], fused=False, **base)
    return fused, pure, params, gen


def run_case(case: Case, monkeypatch, steps: int = STEPS) -> int:
    """Steps both optimizers on the same gradients, comparing after every step; returns
    the largest parameter difference seen, in ulp."""
    ties = TieWatch(monkeypatch)
    fused, pure, params, gen = build_pair(case)
    threads = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    worst = 0
    grads: list = []
    try:
        for t in range(1, steps + 1):
            if not (case.fixed_grads and grads):
                grads = []
                for i, (fp, _, h) in enumerate(params):
                    every = case.skip_every.get(i)
                    skip = every is not None and t % every == 0
                    grads.append(
                        None if skip else make_grad(fp.shape, fp.dtype, h["topk_block_size"], gen)
                    )
            for (fp, pp, _), grad in zip(params, grads, strict=True):
                fp.grad = None if grad is None else grad.clone()
                pp.grad = None if grad is None else grad.clone()
            # Stochastic rounding seeds are drawn from torch's generator at the first step.
            torch.manual_seed(t)
            fused.step()
            torch.manual_seed(t)
            pure.step()
            assert ties.ties == 0, f"step {t}: a Top-K tie in the pure path; change the seed"
            for i, ((fp, pp, _), grad) in enumerate(zip(params, grads, strict=True)):
                where = f"step {t}, param {i} (shape {tuple(fp.shape)}, {fp.dtype})"
                if grad is not None:
                    assert torch.equal(fp.grad, grad), f"{where}: p.grad was written"
                assert_same_state(fused.state[fp], pure.state[pp], where)
                distance = ulp_distance(fp, pp)
                assert distance <= 2, f"{where}: parameters differ by {distance} ulp"
                worst = max(worst, distance)
    finally:
        torch.set_num_threads(threads)
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_pure(name, fused_kernel, monkeypatch):
    assert run_case(CASES[name], monkeypatch) <= 2


def test_kernel_function_has_the_pure_signature(fused_kernel):
    """kernels.micro_adam_cpu.micro_adam_step_ is a drop-in for the pure function."""
    torch.manual_seed(0)
    hyper = {**BASE, "density": 0.05}
    p_fused = torch.randn(3000)
    p_pure = p_fused.clone()
    opt = MicroAdam([torch.nn.Parameter(p_fused.clone())], **hyper)
    state_fused = opt._init_state(opt.param_groups[0]["params"][0], opt.param_groups[0])
    state_pure = copy.deepcopy(state_fused)
    for _ in range(5):
        grad = torch.randn(3000)
        kernel.micro_adam_step_(p_fused, grad, state_fused, **hyper)
        micro_adam_module.micro_adam_step_(p_pure, grad, state_pure, **_pure_arguments(hyper))
    assert_same_state(state_fused, state_pure, "after 5 steps")
    assert torch.equal(p_fused, p_pure)


@pytest.mark.parametrize("seed", [0, -1, -(2**63), 2**63 - 1, 0x9E3779B97F4A7C15 - 2**64])
@pytest.mark.parametrize("step", [0.0, 999_999.0, 2.0**24 - 4])
def test_kernel_step_numbers_match_pure_for_any_seed_and_step(seed, step, fused_kernel):
    """The kernel derives t, the window row, the decay factors, the bias corrections and the
    stochastic-rounding key from the state's step and seed itself: for seeds of any sign and
    size (a checkpoint may carry any int64) and steps up to float32's last exact integers,
    they must be the PyTorch path's."""
    hyper = {**BASE, "density": 0.05, "rounding": "stochastic", "weight_decay": 0.01}
    torch.manual_seed(0)
    p_fused = torch.randn(2000)
    p_pure = p_fused.clone()
    opt = MicroAdam([torch.nn.Parameter(p_fused.clone())], **hyper)
    state_fused = opt._init_state(opt.param_groups[0]["params"][0], opt.param_groups[0])
    state_fused["rng_seed"] = torch.tensor(seed, dtype=torch.int64)
    state_fused["step"] = torch.tensor(step, dtype=torch.float32)
    state_pure = copy.deepcopy(state_fused)
    for _ in range(3):
        grad = torch.randn(2000)
        kernel.micro_adam_step_(p_fused, grad, state_fused, **hyper)
        micro_adam_module.micro_adam_step_(p_pure, grad, state_pure, **_pure_arguments(hyper))
    assert_same_state(state_fused, state_pure, f"seed {seed}, step {step}")
    assert ulp_distance(p_fused, p_pure) <= 2


@pytest.mark.parametrize(
    "fused",
    [
        True,
        False,
        pytest.param(
            "compiled",
            marks=pytest.mark.skipif(
                compiled_kernel.unavailable_reason() is not None,
                reason=str(compiled_kernel.unavailable_reason()),
            ),
        ),
    ],
)
def test_step_count_stops_at_float32s_last_exact_integer(fused, fused_kernel):
    p = torch.nn.Parameter(torch.randn(300))
    fresh = torch.nn.Parameter(torch.randn(10))  # its state made at the refused step goes
    opt = MicroAdam([p, fresh], fused=fused)
    p.grad = torch.randn(300)
    opt.step()
    opt.state[p]["step"].fill_(2.0**24 - 2)
    opt.step()  # step 2^24 - 1: the last one
    fresh.grad = torch.randn(10)
    x, st = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match=r"step count is 16777215.*at most 16777215 steps"):
        opt.step()
    assert torch.equal(p, x)
    assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    assert len(opt.state[fresh]) == 0


# -- dispatch, fallback, checkpoints, policies -----------------------------------------


def test_invalid_fused_is_rejected():
    p = torch.nn.Parameter(torch.zeros(3))
    for bad in (1, "yes", 0.0, "Triton"):
        with pytest.raises(ValueError) as info:
            MicroAdam([p], fused=bad)
        assert str(info.value) == (
            f"Invalid fused: {bad!r} (expected None, True, False or one of 'eager', "
            "'compiled', 'triton', 'cpu')"
        )


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (dict(dtype=torch.float64), "torch.float64 parameters"),
        (dict(quant_block_size=100_000), "lcm above"),
        (dict(value_dtype=torch.float64), "value_dtype torch.float64"),
        (dict(grad_dtype=torch.float32, dtype=torch.bfloat16), "gradients of torch.bfloat16"),
    ],
)
def test_fused_true_raises_where_uncovered_and_none_falls_back(setup, reason, fused_kernel):
    setup = dict(setup)
    dtype = setup.pop("dtype", torch.float32)
    grad_dtype = setup.pop("grad_dtype", dtype)
    p = torch.nn.Parameter(torch.randn(5000, dtype=dtype))
    x0 = p.detach().clone()
    if grad_dtype != dtype:
        if not hasattr(p, "grad_dtype"):
            pytest.skip("this torch does not allow a gradient of another dtype")
        p.grad_dtype = None  # allow it (torch >= 2.9)
    p.grad = torch.randn(5000, dtype=grad_dtype)
    strict = MicroAdam([p], fused=True, **setup)
    with pytest.raises(RuntimeError, match=r"fused=True.*" + reason):
        strict.step()
    assert torch.equal(p, x0) and len(strict.state[p]) == 0  # nothing was updated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncovered configuration is not a failure
        MicroAdam([p], **setup).step()
    assert not torch.equal(p, x0)


def test_failed_build_warns_once_and_falls_back(broken_fused_kernel):
    torch.manual_seed(0)
    grads = [torch.randn(2000) for _ in range(3)]
    a = torch.nn.Parameter(torch.randn(2000))
    b = torch.nn.Parameter(a.detach().clone())
    opt = MicroAdam([a], density=0.05)
    ref = MicroAdam([b], density=0.05, fused=False)
    with pytest.warns(RuntimeWarning) as record:
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "c++ not found (simulated)" in messages[0] and "pure-PyTorch step" in messages[0]
    assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second optimizer does not warn again
        MicroAdam([a], density=0.05).step()
    a.grad = grads[0].clone()
    with pytest.raises(RuntimeError, match=r"fused=True.*c\+\+ not found \(simulated\)"):
        MicroAdam([a], fused=True).step()


def test_disable_variable_forces_the_pure_path(restore_kernel_state):
    monkeypatch = restore_kernel_state
    monkeypatch.setattr(kernel, "_ops", None)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setenv(kernel.DISABLE_ENV, "1")
    monkeypatch.setattr(kernel, "_load_library", lambda: pytest.fail("must not build"))
    calls = []
    original = micro_adam_module.micro_adam_step_
    monkeypatch.setattr(
        micro_adam_module,
        "micro_adam_step_",
        lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs)),
    )
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabling on purpose is not worth a warning
        MicroAdam([p]).step()
    assert calls == [1]
    with pytest.raises(RuntimeError, match="MICROADAM_DISABLE_FUSED=1"):
        MicroAdam([p], fused=True).step()


def test_disable_variable_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import warnings, torch
        from microadam import MicroAdam
        from microadam.kernels import micro_adam_cpu as kernel
        warnings.simplefilter("error")
        p = torch.nn.Parameter(torch.randn(100)); p.grad = torch.randn(100)
        MicroAdam([p]).step()
        assert kernel._ops is None and "disabled" in kernel.unavailable_reason()
        print("pure")
        """
    )
    env = {**__import__("os").environ, kernel.DISABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pure"


@pytest.mark.parametrize("first", [True, False], ids=["fused-then-pure", "pure-then-fused"])
def test_checkpoint_moves_between_paths(first, fused_kernel):
    torch.manual_seed(0)
    grads = [torch.randn(3000) for _ in range(10)]
    hyper = dict(density=0.02, rounding="stochastic", weight_decay=0.01, topk_block_size=512)

    def train(opt, p, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    x0 = torch.randn(3000)
    p_all = torch.nn.Parameter(x0.clone())
    straight = MicroAdam([p_all], fused=first, **hyper)
    torch.manual_seed(1)  # the rounding seed is drawn at the first step
    train(straight, p_all, grads)

    p = torch.nn.Parameter(x0.clone())
    before = MicroAdam([p], fused=first, **hyper)
    torch.manual_seed(1)
    train(before, p, grads[:5])
    saved = before.state_dict()
    after = MicroAdam([p], fused=not first, **hyper)
    after.load_state_dict(saved)
    for group in after.param_groups:  # the loaded groups carry the saving optimizer's flag
        group["fused"] = not first
    train(after, p, grads[5:])
    assert torch.equal(p, p_all)
    assert_same_state(after.state[p], straight.state[p_all], "resumed vs uninterrupted")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(dtype, bad, fused_kernel):
    a = torch.nn.Parameter(torch.randn(5000, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(300, dtype=dtype))
    opt = MicroAdam([a, b], density=0.1, weight_decay=0.1, fused=True)
    a.grad, b.grad = torch.randn(5000, dtype=dtype), torch.randn(300, dtype=dtype)
    opt.step()
    saved = {
        p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in (a, b)
    }
    a.grad = torch.randn(5000, dtype=dtype)
    b.grad = torch.randn(300, dtype=dtype)
    b.grad[299] = bad
    with pytest.raises(RuntimeError, match=r"non-finite gradient .* parameter 1 of param group 0"):
        opt.step()
    for p, (x, st) in saved.items():
        assert torch.equal(p, x)
        assert_same_state(opt.state[p], st, "after the refused step")


def test_corrupted_window_index_is_refused(fused_kernel):
    p = torch.nn.Parameter(torch.randn(1000))
    opt = MicroAdam([p], topk_block_size=100, fused=True)
    p.grad = torch.randn(1000)
    opt.step()
    opt.state[p]["window_indices"][0, 3] = 500  # outside its block of 100
    with pytest.raises(RuntimeError, match="outside its Top-K block"):
        opt.step()


PORTABLE_CASES = [
    "f32-density1pct-ef4",
    "f32-default-layout-1pct",
    "f32-no-error-feedback",
    "stochastic-4bit",
    "bf16-params-fast-layout",
    "bf16-params-weight-decay-stochastic",
    "two-threads-many-units",
]


def _runs_x86_64_v3() -> bool:
    """Whether this CPU runs an -march=x86-64-v3 build (AVX2, FMA, F16C, BMI, ...)."""
    if not kernel._is_x86_64():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return all(f in flags for f in ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"))


@pytest.mark.parametrize("arch", ["portable", "avx2"])
def test_portable_build_matches_pure(arch, fused_kernel):
    """The kernel built by MICROADAM_CPU_ARCH=portable (SSE2 on x86-64) and =avx2 (x86-64-v3:
    no AVX-512 loops, what AVX2 CPUs run), in a fresh process since a process holds one
    build of the operator library."""
    if arch == "avx2" and not _runs_x86_64_v3():
        pytest.skip("this CPU does not run x86-64-v3 code")
    code = textwrap.dedent(
        f"""
        import sys
        from _pytest.monkeypatch import MonkeyPatch
        from microadam.kernels import micro_adam_cpu as kernel
        assert kernel.unavailable_reason() is None, kernel.unavailable_reason()
        assert kernel.build_target != "native", kernel.build_target
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        import test_fused_cpu as t
        for name in {PORTABLE_CASES!r}:
            mp = MonkeyPatch()
            try:
                assert t.run_case(t.CASES[name], mp, steps=12) <= 2, name
            finally:
                mp.undo()
        print("ok")
        """
    )
    env = {**os.environ, kernel.ARCH_ENV: arch}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize(
    ("value", "march"),
    [
        (None, ["-march=native", None]),
        ("native", ["-march=native", None]),
        (" AVX2 ", ["-march=x86-64-v3"]),
        ("portable", ["-march=x86-64"]),
    ],
)
def test_arch_variable_chooses_the_flags(value, march, monkeypatch):
    if value is None:
        monkeypatch.delenv(kernel.ARCH_ENV, raising=False)
    else:
        monkeypatch.setenv(kernel.ARCH_ENV, value)
    if not kernel._is_x86_64() and "native" not in march[0]:
        pytest.skip("x86-64 flags")
    sets = kernel._flag_sets()
    assert [next((f for f in s if f.startswith("-march")), None) for s in sets] == march
    assert len({tuple(s) for s in sets}) == len(sets)  # flags are part of the cache key


def test_invalid_arch_variable_is_a_failed_build(restore_kernel_state):
    monkeypatch = restore_kernel_state
    monkeypatch.setattr(kernel, "_ops", None)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setenv(kernel.ARCH_ENV, "avx9")
    assert kernel.unavailable_reason() == (
        "ValueError: Invalid MICROADAM_CPU_ARCH: 'avx9' (expected native, avx2 or portable)"
    )


def test_build_says_it_is_compiling_once(tmp_path, monkeypatch, capsys):
    """The first fused step of a machine compiles for about 10 s: it says so, once; a
    cached build loads silently. (A stand-in compiler writes an empty library.)"""
    compiler = tmp_path / "fake-c++"
    compiler.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\ntouch "$2"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel, "build_seconds", kernel.build_seconds)
    monkeypatch.setattr(kernel, "build_target", kernel.build_target)
    first = kernel.build()
    err = capsys.readouterr().err
    assert err.startswith("microadam: compiling the fused CPU step (-march="), err
    assert f"cached in {tmp_path / 'cache'}" in err
    assert kernel.build() == first
    assert capsys.readouterr().err == ""


# A dtype that every state entry's own dtype is not (the kernel must refuse it).
_WRONG_DTYPE = {
    torch.float32: torch.float64,
    torch.bfloat16: torch.float64,
    torch.int16: torch.int32,
    torch.uint8: torch.int8,
    torch.int64: torch.int32,
}


@pytest.mark.parametrize("entry", STATE_LAYOUT, ids=lambda e: e.key)
def test_kernel_checks_each_state_tensor_of_the_layout(entry, fused_kernel):
    """The kernel reads the state by STATE_LAYOUT's keys and refuses a tensor of another
    dtype than the layout's, naming its key, with nothing changed: its checks and the
    table cannot drift apart."""
    hyper = {**BASE, "density": 0.05, "rounding": "stochastic", "error_feedback": True}
    opt = MicroAdam([torch.nn.Parameter(torch.randn(3000))], **hyper)
    p = opt.param_groups[0]["params"][0]
    state = opt._init_state(p, opt.param_groups[0])
    assert entry.present(hyper), "the case must have every entry of the layout"
    good = state[entry.key]
    state[entry.key] = good.to(_WRONG_DTYPE[entry.dtype_for(opt.param_groups[0])])
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=rf"microadam fused CPU step: {entry.key}\b"):
        kernel.micro_adam_multi_step_(
            [p.detach()], [torch.randn(3000)], [state], **_pure_arguments(hyper)
        )
    assert torch.equal(p.detach(), before)
