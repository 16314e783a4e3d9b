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

MicroAdam and Adapprox both save their DTensor parameters' state this way:
:func:`shard_states` applies the scheme to every DTensor parameter of an optimizer's
``state_dict()`` and :func:`local_states` undoes it for every parameter of a state dict
being loaded. ``step`` (the same number on every rank) stays a plain tensor, which DCP
saves once as replicated; everything else, integer and uint8 tensors included, is stacked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "all_ranks_agree",
    "is_dtensor",
    "local",
    "local_state_value",
    "local_states",
    "max_local_shape",
    "num_shards",
    "shard_index",
    "shard_shapes",
    "shard_state_value",
    "shard_states",
]

# Where a saved parameter id points: the parameter and its group's settings (as
# ``_common.params_by_saved_id`` makes it).
ParamsById = Mapping[Any, tuple[torch.Tensor, dict[str, Any]]]


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


def shard_shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
    """The local shape of every shard of DTensor ``p``, in the order of :func:`shard_index`:
    chunked as ``torch.chunk`` does along each sharded mesh dimension, so the last shards
    can be smaller than the first, or empty."""
    from torch.distributed.tensor import Shard

    shapes = [list(p.shape)]
    for i, pl in enumerate(p.placements):
        if not isinstance(pl, Shard):
            continue
        n, d = p.device_mesh.size(i), pl.dim
        pieces = []
        for shape in shapes:
            chunk = -(-shape[d] // n)
            for c in range(n):
                piece = list(shape)
                piece[d] = max(0, min(chunk, shape[d] - c * chunk))
                pieces.append(piece)
        shapes = pieces
    return [tuple(s) for s in shapes]


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


def _lazy_where(describe: Callable[[torch.Tensor], str], p: torch.Tensor) -> Any:
    """How error messages name ``p``, made only when one is raised."""
    from microadam.optim._common import LazyText  # _common imports this module

    return LazyText(lambda: describe(p))


def shard_states(
    state: dict[Any, Any],
    params: ParamsById,
    layout: Callable[
        [torch.Tensor, dict[str, Any], dict[str, Any]],
        tuple[dict[str, Any], Mapping[str, tuple[int, ...]]],
    ],
    describe: Callable[[torch.Tensor], str],
) -> None:
    """Apply the scheme, in place, to ``state`` (the ``state`` of ``Optimizer.state_dict()``,
    whose values are the optimizer's own dicts: they are replaced, never changed).

    For every DTensor parameter of ``params`` with state, ``layout(param, group, state)``
    gives the state to save (the parameter's own, or a new dict with entries added) and
    the largest shard's shape of each of its keys; every tensor but ``step`` becomes a
    :func:`shard_state_value` of that shape. The same ``layout`` must give the same shapes
    on every rank of the parameter's mesh.
    """
    for pid, (p, group) in params.items():
        if not is_dtensor(p) or pid not in state:
            continue
        where = _lazy_where(describe, p)
        saved, max_shapes = layout(p, group, state[pid])
        stacked = {}
        for key, value in saved.items():
            if key != "step" and isinstance(value, torch.Tensor):
                if key not in max_shapes:
                    raise RuntimeError(f"{where}: state {key!r} has no checkpoint layout")
                value = shard_state_value(p, value, max_shapes[key], where)
            stacked[key] = value
        state[pid] = stacked


def local_states(
    state: dict[Any, Any],
    params: ParamsById,
    local_shapes: Callable[
        [torch.Tensor, dict[str, Any], dict[str, Any]], Mapping[str, tuple[int, ...]]
    ],
    describe: Callable[[torch.Tensor], str],
) -> dict[Any, Any]:
    """``state`` (a state dict's being loaded) with the stacked state of every DTensor
    parameter back as this rank's plain tensors: each key that ``local_shapes(param,
    group, saved_state)`` names becomes :func:`local_state_value` of that shape; ``step``,
    other values and keys it does not name stay as they are (the load checks judge them).
    ``ValueError`` for state saved for another sharding, or saved sharded for a parameter
    that is not a DTensor here."""
    new_state = {}
    for pid, saved in state.items():
        p, group = params.get(pid, (None, None))
        if p is None or not isinstance(saved, dict):
            new_state[pid] = saved
            continue
        where = _lazy_where(describe, p)
        if not is_dtensor(p):
            for key, value in saved.items():
                if is_dtensor(value):
                    raise ValueError(
                        f"Invalid state_dict: {key} of {where} was saved from a parameter "
                        f"sharded over {value.shape[0]} rank(s) (a DTensor of shape "
                        f"{tuple(value.shape)}), but this parameter is not sharded; "
                        "per-shard optimizer state cannot be resharded"
                    )
            new_state[pid] = saved
            continue
        shapes = local_shapes(p, group, saved)
        new_state[pid] = {
            key: local_state_value(p, value, shapes[key], where, key)
            if key != "step" and key in shapes and isinstance(value, torch.Tensor)
            else value
            for key, value in saved.items()
        }
    return new_state


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
