"""MicroAdam's state is what its one definition (``STATE_LAYOUT``) says, on every path."""

from __future__ import annotations

import itertools

import pytest
import torch

from microadam import MicroAdam, state_bytes
from microadam.optim.micro_adam_state import (
    STATE_LAYOUT,
    expected_state,
    memory_formula,
    state_nbytes,
)

SETTINGS = [
    dict(),
    dict(density=0.1, topk_block_size=64, quant_block_size=32, window_size=3),
    dict(quant_bits=8, value_dtype=torch.float32),
    dict(error_feedback=False),
    dict(rounding="stochastic", density=0.5, topk_block_size=100, quant_block_size=7),
]
SHAPES = [(1,), (33,), (5, 70), (4097,)]
PATHS = ["eager", "cpu"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("settings", "shape"), list(itertools.product(SETTINGS, SHAPES)))
def test_state_after_a_step_is_the_layout(settings, shape, path):
    p = torch.nn.Parameter(torch.randn(shape))
    opt = MicroAdam([p], fused=path, **settings)
    p.grad = torch.randn(shape)
    opt.step()
    group = opt.param_groups[0]
    want = expected_state(p.numel(), group)
    state = opt.state[p]
    assert set(state) == set(want)
    for key, (shape_, dtype, _) in want.items():
        assert tuple(state[key].shape) == shape_, key
        assert state[key].dtype == dtype, key
    assert state_bytes(opt) == state_nbytes(p.numel(), group)


def test_nbytes_formula_at_the_defaults():
    # 0.5 d + 4 m k + 4 ceil(d / Q) bytes, plus the 4-byte step: the docstring's formula.
    d = 4096 * 256
    group = MicroAdam([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    k = 41 * 256  # ceil(1% of 4096) per block
    assert state_nbytes(d, group) == d // 2 + 4 * 10 * k + 4 * (d // 256) + 4
    assert 0.91 < state_nbytes(d, group) / d < 0.93


def test_docstring_lists_every_state_tensor():
    doc = MicroAdam.__doc__
    assert memory_formula().splitlines()[0] in doc.replace("\n    ", "\n")
    for entry in STATE_LAYOUT:
        assert f"``{entry.key}``" in doc


def test_a_state_entry_of_another_dtype_is_refused_on_load():
    p = torch.nn.Parameter(torch.randn(50))
    opt = MicroAdam([p], density=0.1)
    p.grad = torch.randn(50)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["window_indices"] = sd["state"][0]["window_indices"].int()
    fresh = MicroAdam([p], density=0.1)
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(sd)
    assert str(info.value) == (
        "Invalid state_dict: MicroAdam state of parameter 0 of param group 0 (shape (50,)): "
        "window_indices has dtype torch.int32, expected torch.int16 from the state dict's "
        "param group"
    )
    assert len(fresh.state) == 0
