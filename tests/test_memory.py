"""state_bytes counts every state tensor once, for any optimizer."""

import pytest
import torch

from microadam import state_bytes, state_bytes_per_param


def test_adam_state_bytes():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(1000)
    opt.step()
    assert state_bytes(opt) == 2 * 4000 + 4  # exp_avg, exp_avg_sq, float32 step
    assert state_bytes_per_param(opt) == pytest.approx(8.004)


def test_shared_storage_counted_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.zeros(100)
    opt.state[p]["a"] = buf[:50]
    opt.state[p]["b"] = buf[50:]  # another view of the same storage
    opt.state[p]["nested"] = {"c": [torch.zeros(3, dtype=torch.float64)], "n": 3}
    assert state_bytes(opt) == 400 + 24


def test_rejects_non_optimizers():
    with pytest.raises(TypeError, match=r"Invalid optimizer: expected a torch\.optim\.Optimizer"):
        state_bytes(object())
