"""The pure-PyTorch step on an accelerator must not wait for it.

An accelerator runs kernels asynchronously; the host stalls whenever it reads a value off
the device (``.item()``, ``bool(tensor)``) or makes a blocking host-to-device copy (such as
``torch.tensor(list, device=...)``). Without a GPU here, the step runs on the ``meta``
device, where every kernel is only shape-checked, under a dispatch mode that counts the
reads of device values and the copies from the host. After the first ``2 m`` steps (which
fill the cache of decay weights) a step of any number of parameters and chunks reads one
value per device (the non-finite check) and copies nothing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import microadam.optim.micro_adam as micro_adam_module
from microadam import MicroAdam
from microadam.optim._common import first_non_finite


class SyncCounter(TorchDispatchMode):
    """Counts host reads of device tensors, host-to-device copies and device ops.

    A read of a meta tensor would raise; here it is answered with a finite-looking value
    so that the step goes on and every read is counted."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.copies = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(t.device.type != "cpu" for t in tensors)
        if func is torch.ops.aten._local_scalar_dense.default and on_device:
            self.reads += 1
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **kwargs)
        if func is torch.ops.aten.copy_.default:
            src, dst = args[1], args[0]
        elif func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
        else:
            src = dst = None
        if src is not None and src.device.type == "cpu" and dst.device.type != "cpu":
            self.copies += 1
        self.ops += on_device
        return out

    def __enter__(self):
        # torch.tensor(data, device=...) copies from the host below the dispatcher.
        self._constructors = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
        for name, make in self._constructors.items():

            def counted(*args, _make=make, **kwargs):
                out = _make(*args, **kwargs)
                if isinstance(out, torch.Tensor) and out.device.type != "cpu":
                    self.copies += 1
                return out

            setattr(torch, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, make in self._constructors.items():
            setattr(torch, name, make)
        return super().__exit__(*exc)


SETTINGS = {
    "nearest-4bit": dict(density=0.05, weight_decay=0.1),
    "stochastic-8bit": dict(density=0.05, rounding="stochastic", quant_bits=8),
    "no-error-feedback": dict(density=0.02, error_feedback=False, maximize=True),
    # lcm(96, 80) = 480 > max_aligned_chunk below: the two-pass quantization.
    "two-pass": dict(density=0.05, topk_block_size=96, quant_block_size=80),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_pure_step_off_cpu_reads_once_and_copies_nothing(name, monkeypatch):
    # Small chunks, so that every parameter below is walked in several of them.
    monkeypatch.setattr(micro_adam_module, "DEFAULT_CHUNK_SIZE", 1024)
    monkeypatch.setattr(micro_adam_module, "MAX_ALIGNED_CHUNK", 256)
    settings = {"topk_block_size": 256, "quant_block_size": 64, **SETTINGS[name]}
    shapes = [(3000,), (70, 30), (), (5,), (4100,)]
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    params.append(torch.nn.Parameter(torch.empty(600, device="meta", dtype=torch.bfloat16)))
    opt = MicroAdam(params, window_size=3, fused=None, **settings)
    for step in range(1, 10):
        for p in params:
            p.grad = torch.empty_like(p)
        counter = SyncCounter()
        with counter:
            opt.step()
        assert counter.ops > 100  # the step did run on the device
        if step > 2 * 3:  # decay weights cached for every arrangement of the window
            assert (counter.reads, counter.copies) == (1, 0), f"step {step}"
    assert all(opt.state[p]["step"].device.type == "cpu" for p in params)


def test_first_non_finite_names_the_first_bad_tensor():
    ok = [torch.randn(5), torch.randn(3, dtype=torch.bfloat16), torch.empty(0), torch.tensor(1.0)]
    assert first_non_finite(ok) is None
    assert first_non_finite([]) is None
    for bad_value in (math.nan, math.inf, -math.inf):
        for where in range(len(ok)):
            if ok[where].numel() == 0:
                continue
            tensors = [t.clone() for t in ok]
            tensors[where].view(-1)[-1] = bad_value
            later = torch.full((2,), math.nan, dtype=torch.float16)
            assert first_non_finite([*tensors, later]) == where
    # float16 values near its maximum do not overflow the max-norm
    assert first_non_finite([torch.full((4,), 65504.0, dtype=torch.float16)]) is None
