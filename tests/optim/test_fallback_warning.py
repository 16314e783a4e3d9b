"""The warning of ``MicroAdam(fused=None)`` when the C++ kernel cannot be built: it says how
much slower the pure step is and points at the user's ``optimizer.step()`` line, through
torch's step hooks."""

from __future__ import annotations

import warnings

import torch

from microadam import MicroAdam
from microadam.optim.micro_adam import PURE_CPU_SLOWDOWN


def test_the_fallback_warning_says_how_much_slower_and_points_at_the_step(broken_fused_kernel):
    p = torch.nn.Parameter(torch.randn(2000))
    p.grad = torch.randn(2000)
    opt = MicroAdam([p])
    opt.register_step_pre_hook(lambda *args: None)  # torch's hook wrapper is in the stack
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert caught[0].category is RuntimeWarning
    assert "c++ not found (simulated)" in message
    assert f"about {PURE_CPU_SLOWDOWN}x slower than the fused one" in message
    assert caught[0].filename == __file__
    assert 10 <= PURE_CPU_SLOWDOWN <= 100
