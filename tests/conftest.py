"""Fixtures shared across the test folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def fused_kernel():
    """MicroAdam's fused CPU kernel module (built on first use), or a skip saying why there
    is none on this machine."""
    from microadam.kernels import micro_adam_cpu as kernel

    reason = kernel.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the fused CPU kernel is unavailable here: {reason}")
    return kernel


@pytest.fixture
def broken_fused_kernel(monkeypatch):
    """A fused CPU kernel whose build fails in this test (as with no compiler); the loaded
    one comes back afterwards. Returns the monkeypatch, for more fakes."""
    from microadam.kernels import micro_adam_cpu as kernel

    for name in ("_ops", "_failure", "_failure_is_error", "_warned"):
        monkeypatch.setattr(kernel, name, getattr(kernel, name))
    monkeypatch.setattr(kernel, "_ops", None)
    monkeypatch.setattr(kernel, "_failure", None)
    monkeypatch.setattr(kernel, "_warned", False)

    def broken():
        raise RuntimeError("c++ not found (simulated)")

    monkeypatch.setattr(kernel, "_load_library", broken)
    return monkeypatch
