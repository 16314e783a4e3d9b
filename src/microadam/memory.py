"""How much memory an optimizer holds.

``state_bytes`` is the figure the bench and the README compare optimizers by: the bytes of
every tensor reachable from ``optimizer.state``, each underlying storage counted once (two
views of one buffer are one buffer). It works for any ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["num_params", "state_bytes", "state_bytes_per_param"]


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Plain tensors reachable from ``obj``, looking inside tensor subclasses (DTensor's local
    shard, torchao's quantized optimizer states) so that their real buffers are counted."""
    if isinstance(obj, torch.Tensor):
        if is_traceable_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in ``optimizer.state``, each storage counted once.

    Python numbers kept in the state are not counted; the tensors of optimizers that keep
    their buffers in ``optimizer.state`` (every torch.optim optimizer and every optimizer of
    this package) are. Empty storages count zero.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1000))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(1000); opt.step()
        >>> state_bytes(opt)  # exp_avg and exp_avg_sq in float32, plus a 4-byte step
        8004
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    seen: dict[tuple[str, int], int] = {}
    for per_param in optimizer.state.values():
        for t in _tensors(per_param):
            storage = t.untyped_storage()
            if storage.nbytes() == 0:
                continue
            # Views share one storage: key it by device and data pointer.
            key = (str(t.device), storage.data_ptr())
            seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def num_params(optimizer: torch.optim.Optimizer) -> int:
    """Number of elements over all parameters the optimizer updates (each counted once)."""
    seen: set[int] = set()
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """``state_bytes(optimizer)`` divided by the number of parameter elements."""
    n = num_params(optimizer)
    return state_bytes(optimizer) / n if n else 0.0
