"""DTensor parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``) in this package's optimizers.

An optimizer steps a DTensor parameter on each rank's local shard: ``p.to_local()`` and
``p.grad.to_local()`` are plain tensors that view the local storage, so an in-place update
of the shard lands in the parameter, and the state built from the shard holds about
``1 / world_size`` of the single-process bytes.

Such per-shard state is not a slice of any global tensor (MicroAdam's Top-K blocks and
buckets are cut per shard), so it cannot be handed to ``torch.distributed.checkpoint``
(DCP) as a plain tensor: DCP treats plain tensors as replicated and would save one rank's
copy for all. :func:`shard_state_value` presents each per-shard state tensor as a DTensor
of global shape ``(num_shards, *padded_local_shape)`` sharded on dim 0 over the parameter's
mesh (row ``r`` is shard ``r``'s state, zero-padded to the largest shard's shape), which
DCP saves and loads per rank. The leading dimension is the number of shards and the
tensor has one more dimension than the plain state, so loading into a different world size,
or into an optimizer whose parameter is not sharded, fails with a size mismatch instead of
loading the wrong numbers. :func:`local_state_value` undoes it on load.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

__all__ = [
    "all_ranks_agree",
    "is_dtensor",
    "local",
    "local_state_value",
    "max_local_shape",
    "num_shards",
    "shard_index",
    "shard_state_value",
]


@functools.cache
def _dtensor_type() -> type | None:
    """DTensor's class (looked up once: ``is_dtensor`` runs per parameter and step)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor viewing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _check_placements(p: torch.Tensor, where: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in p.placements:
        if not isinstance(placement, Replicate | Shard) or type(placement) not in (
            Replicate,
            Shard,
        ):
            raise RuntimeError(
                f"{where} has placement {placement}; only Shard and Replicate placements "
                "(as fully_shard makes them) are supported"
            )


def num_shards(p: torch.Tensor) -> int:
    """Number of distinct local shards of DTensor ``p`` (mesh sizes over Shard placements)."""
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    return math.prod(mesh.size(i) for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


def shard_index(p: torch.Tensor) -> tuple[int, int]:
    """(this rank's shard of DTensor ``p``, the number of shards): its mesh coordinates
    along the sharded mesh dimensions, raveled."""
    from torch.distributed.tensor import Shard

    coord = p.device_mesh.get_coordinate()
    if coord is None:
        raise RuntimeError("this rank is not in the parameter's device mesh")
    r = 0
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            r = r * p.device_mesh.size(i) + coord[i]
    return r, num_shards(p)


def max_local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the largest local shard of DTensor ``p``: DTensor shards as ``torch.chunk``
    does, so the first shard along every sharded mesh dimension is the largest."""
    from torch.distributed.tensor import Shard

    shape = list(p.shape)
    mesh = p.device_mesh
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Shard):
            n = mesh.size(i)
            shape[pl.dim] = min(shape[pl.dim], -(-shape[pl.dim] // n))
    return tuple(shape)


def shard_state_value(
    p: torch.Tensor, value: torch.Tensor, max_shape: tuple[int, ...], where: str
) -> torch.Tensor:
    """``value`` (this rank's state of DTensor parameter ``p``) as a DTensor of global shape
    ``(num_shards(p), *max_shape)``, sharded on dim 0 where ``p`` is sharded."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _check_placements(p, where)
    if value.dim() != len(max_shape) or any(
        g > m for g, m in zip(value.shape, max_shape, strict=True)
    ):
        raise RuntimeError(
            f"{where}: state of shape {tuple(value.shape)} does not fit the largest "
            f"shard's shape {max_shape}"
        )
    if tuple(value.shape) != tuple(max_shape):
        # Zero-pad into a copy (a smaller shard's state, or an empty one).
        padded = value.new_zeros(max_shape)
        padded[tuple(slice(0, s) for s in value.shape)] = value
        value = padded
    placements = [Shard(0) if isinstance(pl, Shard) else Replicate() for pl in p.placements]
    global_shape = (num_shards(p), *max_shape)
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(
        value.unsqueeze(0),
        p.device_mesh,
        placements,
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )


def local_state_value(
    p: torch.Tensor, value: Any, shape: tuple[int, ...], where: str, key: str
) -> torch.Tensor:
    """This rank's state tensor of shape ``shape`` from a value made by
    :func:`shard_state_value`; ``ValueError`` if it was saved for another sharding."""
    if not is_dtensor(value):
        raise ValueError(
            f"Invalid state_dict: {key} of {where} is a plain tensor of shape "
            f"{tuple(value.shape)}, but the parameter is a DTensor sharded over "
            f"{num_shards(p)} rank(s); it was saved from an optimizer whose parameter was not "
            "sharded. Load it into the same world size and sharding it was saved from"
        )
    shards = num_shards(p)
    if value.dim() != len(shape) + 1 or value.shape[0] != shards:
        raise ValueError(
            f"Invalid state_dict: {key} of {where} was saved from "
            f"{value.shape[0] if value.dim() else 0} shard(s), but the parameter is sharded "
            f"over {shards} rank(s) here (saved global shape {tuple(value.shape)}). "
            "Per-shard optimizer state cannot be resharded; load it into the world size "
            "it was saved from"
        )
    mine = value.to_local()
    if mine.shape[0] != 1 or any(g < s for g, s in zip(mine.shape[1:], shape, strict=True)):
        raise ValueError(
            f"Invalid state_dict: {key} of {where}: local shard of shape "
            f"{tuple(mine.shape)} does not hold this rank's state of shape {shape}"
        )
    return mine[0][tuple(slice(0, s) for s in shape)]


def all_ranks_agree(ok: list[bool], params: list[torch.Tensor]) -> list[bool]:
    """``ok`` combined with logical AND over every rank of the DTensors' meshes, so that all
    ranks take the same decision (one small all-reduce per mesh dimension)."""
    import torch.distributed as dist

    flags = torch.tensor([1 if o else 0 for o in ok], dtype=torch.int32)
    seen = set()
    for p in params:
        mesh = p.device_mesh
        for i in range(mesh.ndim):
            group = mesh.get_group(i)
            if id(group) in seen:
                continue
            seen.add(id(group))
            dev = torch.device(mesh.device_type)
            moved = flags.to(dev)
            dist.all_reduce(moved, op=dist.ReduceOp.MIN, group=group)
            flags = moved.cpu()
    return [bool(f) for f in flags.tolist()]
