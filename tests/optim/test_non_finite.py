"""Non-finite gradients never reach the state: MicroAdam's paths, Adapprox and Muon.

The documented policy (MicroAdam's "Non-finite gradients" note): ``step`` raises
``NonFiniteGradientError`` (a ``RuntimeError``) naming the parameter, and every parameter
and state buffer stays as it was, so the caller can skip the batch and go on. Checked here
for the pure-PyTorch step (``fused=False``), the fused kernel (``fused=True``) and a step
that mixes the two (a float64 parameter, which the kernel does not cover, beside float32
ones), at the first step (no state yet) and later, for NaN, +inf and -inf in either
parameter.
"""

from __future__ import annotations

import pytest
import torch

from microadam import Adapprox, MicroAdam, NonFiniteGradientError
from microadam.kernels import micro_adam_cpu as kernel
from microadam.optim import Muon, MuonClip

BAD = [float("nan"), float("inf"), -float("inf")]


def _fused_modes():
    modes = [pytest.param(False, id="pure")]
    reason = kernel.unavailable_reason()
    mark = pytest.mark.skipif(reason is not None, reason=f"no fused kernel: {reason}")
    modes.append(pytest.param(True, id="fused", marks=mark))
    modes.append(pytest.param(None, id="mixed", marks=mark))
    return modes


def _snapshot(opt, params):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that NaN, -0 and dtypes compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_unchanged(opt, params, snapshot):
    for i, (p, (x, st)) in enumerate(zip(params, snapshot, strict=True)):
        assert torch.equal(_bits(p), _bits(x)), f"param {i} changed"
        assert opt.state[p].keys() == st.keys(), f"param {i}: state keys changed"
        for key, value in st.items():
            got = opt.state[p][key]
            assert got.dtype == value.dtype, f"param {i}: {key} dtype"
            assert torch.equal(_bits(got), _bits(value)), f"param {i}: {key} changed"


def _assert_state_finite(opt, params):
    for p in params:
        for key, value in opt.state[p].items():
            if value.dtype.is_floating_point:
                assert bool(torch.isfinite(value.float()).all()), key


def _make(fused, dtype):
    """Three parameters; under ``fused=None`` the middle one is float64 (pure path)."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [dtype, torch.float64 if fused is None else dtype, dtype]
    params = [
        torch.nn.Parameter(torch.randn(n, generator=gen).to(dt))
        for n, dt in zip((3000, 257, 40), dtypes, strict=True)
    ]
    opt = MicroAdam(
        params,
        lr=1e-2,
        density=0.1,
        weight_decay=0.1,
        topk_block_size=128,
        quant_block_size=32,
        fused=fused,
    )
    return opt, params, gen


@pytest.mark.parametrize("fused", _fused_modes())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("bad_param", [0, 1, 2])
@pytest.mark.parametrize("first_step", [True, False], ids=["fresh", "later"])
def test_micro_adam_non_finite_gradient_raises_and_changes_nothing(
    fused, dtype, bad, bad_param, first_step
):
    opt, params, gen = _make(fused, dtype)

    def set_grads():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)

    if not first_step:
        for _ in range(3):
            set_grads()
            opt.step()
    snapshot = _snapshot(opt, params)
    set_grads()
    params[bad_param].grad[params[bad_param].numel() // 2] = bad
    shape = tuple(params[bad_param].shape)
    with pytest.raises(
        NonFiniteGradientError,
        match=rf"non-finite gradient \(NaN or inf\) for parameter {bad_param} of param group 0 "
        rf"\(shape \({shape[0]},\)\); nothing was updated",
    ):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    if first_step:
        assert all(len(opt.state[p]) == 0 for p in params)
    # The caller skips the batch; the next good step goes on from the untouched state.
    params[bad_param].grad[params[bad_param].numel() // 2] = 0.0
    opt.step()
    assert all(int(opt.state[p]["step"].item()) == (1 if first_step else 4) for p in params)
    _assert_state_finite(opt, params)


@pytest.mark.parametrize("fused", _fused_modes())
def test_refused_step_does_not_disturb_a_twin_run(fused):
    """A run that meets (and skips) a NaN batch ends bit-identical to one that never saw it."""
    runs = []
    for with_nan in (False, True):
        torch.manual_seed(0)
        opt, params, gen = _make(fused, torch.float32)
        opt.param_groups[0]["rounding"] = "stochastic"
        for t in range(6):
            if with_nan and t == 3:
                for p in params:
                    p.grad = torch.full_like(p, float("nan"))
                with pytest.raises(RuntimeError, match="non-finite"):
                    opt.step()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            assert torch.equal(ob.state[b][key], value), key


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_adapprox_non_finite_gradient_after_steps_changes_nothing(bad):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(12, 8, generator=gen)),
        torch.nn.Parameter(torch.randn(30, generator=gen)),
    ]
    opt = Adapprox(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    snapshot = _snapshot(opt, params)
    for bad_param in (0, 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        params[bad_param].grad.view(-1)[5] = bad
        with pytest.raises(
            NonFiniteGradientError, match=rf"non-finite gradient .* parameter {bad_param} "
        ):
            opt.step()
        _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("cls", [Muon, MuonClip])
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
def test_muon_non_finite_gradient_changes_nothing(cls, bad):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(6, generator=gen))
    opt = cls([{"params": [w]}, {"params": [b], "use_muon": False}])
    for _ in range(2):
        w.grad, b.grad = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
        opt.step()
    snapshot = _snapshot(opt, [w, b])
    for bad_param, where in (
        (w, "parameter 0 of param group 0"),
        (b, "parameter 0 of param group 1"),
    ):
        w.grad, b.grad = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
        bad_param.grad.view(-1)[3] = bad
        with pytest.raises(NonFiniteGradientError) as info:
            opt.step()
        assert str(info.value).startswith(f"Muon: non-finite gradient (NaN or inf) for {where} ")
        _assert_unchanged(opt, [w, b], snapshot)
