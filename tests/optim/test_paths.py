"""MicroAdam's ways to step (``fused``): which one is picked, and checkpoints moving freely
between them.

Every path keeps the same state, so a checkpoint written on one continues on any other:
resumed on path B after 5 steps on path A, 5 more steps give exactly the state of 10
steps on path B, and parameters equal up to the rounding in which the paths' updates
differ (none between the pure step, the CPU kernel and the Triton kernel, which runs here
under ``TRITON_INTERPRET=1``; a few float32 roundings for the compiled step).
"""

from __future__ import annotations

import io

import pytest
import torch

import microadam.optim.micro_adam as micro_adam_module
from kernels.test_fused_cpu import assert_same_state, make_grad
from microadam import MicroAdam
from microadam.kernels import micro_adam_compiled, micro_adam_cpu, micro_adam_triton
from microadam.optim.micro_adam import choose_path

# -- choosing ----------------------------------------------------------------------------


def _reasons(**unavailable):
    return lambda path: unavailable.get(path)


@pytest.mark.parametrize(
    ("fused", "device", "unavailable", "expected"),
    [
        (None, "cpu", {}, ("cpu", None)),
        (None, "cpu", {"cpu": "no compiler"}, ("eager", None)),
        (None, "cuda", {}, ("triton", None)),
        (None, "cuda", {"triton": "not installed"}, ("compiled", None)),
        (None, "cuda", {"triton": "x", "compiled": "y"}, ("eager", None)),
        (None, "mps", {}, ("eager", None)),
        (True, "cpu", {}, ("cpu", None)),
        (True, "cuda", {}, ("triton", None)),
        (True, "cuda", {"triton": "float64"}, ("triton", "float64")),
        (True, "xpu", {"cpu": "parameters on xpu"}, ("cpu", "parameters on xpu")),
        (False, "cuda", {"eager": "never asked"}, ("eager", None)),
        ("eager", "cpu", {}, ("eager", None)),
        ("compiled", "cpu", {}, ("compiled", None)),
        ("compiled", "cuda", {"compiled": "no triton"}, ("compiled", "no triton")),
        ("triton", "cpu", {"triton": "needs TRITON_INTERPRET=1"}, ("triton", "needs ...")),
    ],
)
def test_choose_path(fused, device, unavailable, expected):
    if expected[1] == "needs ...":
        expected = (expected[0], unavailable["triton"])
    assert choose_path(fused, device, _reasons(**unavailable)) == expected


def test_required_path_that_does_not_apply_raises_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(100, dtype=torch.float64))
    p.grad = torch.randn(100, dtype=torch.float64)
    before = p.detach().clone()
    opt = MicroAdam([p], fused="cpu")
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert str(info.value).startswith(
        "MicroAdam(fused='cpu'): the fused CPU step does not cover parameter 0 of param "
        "group 0 (shape (100,)): torch.float64 parameters"
    )
    assert str(info.value).endswith(
        "Pass fused=None to use the best step that applies; nothing was updated"
    )
    assert torch.equal(p, before) and len(opt.state[p]) == 0


# -- checkpoints across paths ------------------------------------------------------------

STEPS = 10
HYPER = dict(
    lr=1e-2,
    density=0.05,
    topk_block_size=128,
    quant_block_size=32,
    window_size=4,
    weight_decay=0.05,
    rounding="stochastic",
)
SHAPES = [(1500,), (3,)]


def _available_paths() -> list[str]:
    """The paths to cross: the Triton kernel runs here under its interpreter."""
    paths = ["eager"]
    if micro_adam_compiled.unavailable_reason() is None:  # torch >= 2.13
        paths.append("compiled")
    if micro_adam_cpu.unavailable_reason() is None:
        paths.append("cpu")
    if micro_adam_triton.unavailable_reason() is None:
        paths.append("triton")
    return paths


def _grads(dtype):
    gen = torch.Generator().manual_seed(7)
    return [[make_grad(s, dtype, 128, gen) for s in SHAPES] for _ in range(STEPS)]


def _train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def small_chunks():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(micro_adam_module, "DEFAULT_CHUNK_SIZE", 1024)
        yield


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_moves_between_paths(dtype, small_chunks, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    paths = _available_paths()
    grads = _grads(dtype)
    x0 = [torch.randn(s, generator=torch.Generator().manual_seed(3)).to(dtype) for s in SHAPES]

    straight = {}
    for path in paths:
        params = [torch.nn.Parameter(x.clone()) for x in x0]
        opt = MicroAdam(params, fused=path, **HYPER)
        torch.manual_seed(11)  # the rounding seeds are drawn at the first step
        _train(opt, params, grads)
        straight[path] = (params, opt)

    for first in paths:
        params = [torch.nn.Parameter(x.clone()) for x in x0]
        opt = MicroAdam(params, fused=first, **HYPER)
        torch.manual_seed(11)
        _train(opt, params, grads[: STEPS // 2])
        saved = _roundtrip(opt.state_dict())
        for second in paths:
            resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt2 = MicroAdam(resumed, fused=second, **HYPER)
            opt2.load_state_dict(saved)
            assert all(g["fused"] == second for g in opt2.param_groups)
            _train(opt2, resumed, grads[STEPS // 2 :])
            ref_params, ref_opt = straight[second]
            for i, (p, q) in enumerate(zip(resumed, ref_params, strict=True)):
                where = f"{first} -> {second}, param {i}"
                assert_same_state(opt2.state[p], ref_opt.state[q], where)
                exact = {first, second} <= {"eager", "cpu", "triton"} or dtype == torch.bfloat16
                if exact:
                    assert torch.equal(p, q), where
                else:
                    torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=where)
