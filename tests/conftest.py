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
