"""Pieces this package's own optimizers share: finding the parameters to step, checking
gradients, naming a parameter in an error message, and checking a state dict's format."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = [
    "FORMAT_KEYS",
    "LazyText",
    "all_finite",
    "check_is_state_dict",
    "check_state_dict_format",
    "describe_param",
    "first_non_finite",
    "lift_format_key",
    "params_by_saved_id",
    "params_with_grad",
]


class LazyText:
    """Text made only when it is formatted: for error messages built on a hot path (naming
    a parameter walks every param group, which per parameter and step would be quadratic)."""

    def __init__(self, make: Callable[[], str]):
        self._make = make

    def __str__(self) -> str:
        return self._make()

    def __format__(self, spec: str) -> str:
        return format(self._make(), spec)


def describe_param(param_groups: list[dict[str, Any]], p: torch.Tensor) -> str:
    """``"parameter 3 of param group 1 (shape (64, 32))"``: how error messages name ``p``."""
    for gi, group in enumerate(param_groups):
        for pi, q in enumerate(group["params"]):
            if q is p:
                return f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
    return f"parameter of shape {tuple(p.shape)}"


def params_with_grad(
    name: str, param_groups: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """``(group, param)`` for every parameter with a gradient, in order; raises
    ``RuntimeError`` on a sparse gradient or a complex parameter before anything is changed.
    ``name`` is the optimizer's, for the message."""
    work = []
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{name} does not support sparse gradients; use torch.optim.SparseAdam "
                    "for sparse embeddings or build them with sparse=False"
                )
            if p.is_complex():
                raise RuntimeError(
                    f"{name} does not support complex parameters; optimize "
                    "torch.view_as_real(param) as a real parameter instead"
                )
            work.append((group, p))
    return work


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf: its min and max propagate both, and computing them
    is one read of ``t`` with no temporary of its size."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack((lo, hi))).all())


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Position of the first tensor in ``tensors`` that holds NaN or inf, else None.

    The tensors are checked together: one ``_foreach_norm(inf)`` (which propagates NaN) per
    device and dtype and one host read per device, so an accelerator synchronises once per
    step instead of once per parameter. Only when something is not finite are the tensors
    looked at one by one, to name the first.
    """
    groups: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.device, {}).setdefault(t.dtype, []).append(t)
    finite = True
    for by_dtype in groups.values():
        norms = [torch.stack(torch._foreach_norm(ts, math.inf)).float() for ts in by_dtype.values()]
        finite = finite and bool(torch.cat(norms).isfinite().all())
    if finite:
        return None
    return next(i for i, t in enumerate(tensors) if not all_finite(t))


# Keys that mark the state dicts of this package's optimizers, and whose they are.
FORMAT_KEYS = {"microadam_format": "MicroAdam", "adapprox_format": "Adapprox"}


def check_is_state_dict(state_dict: Any) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has the two entries of an optimizer's."""
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("param_groups"), list)
        or not isinstance(state_dict.get("state"), dict)
    ):
        got = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict)
        raise ValueError(
            "Invalid state_dict: expected an optimizer state dict with 'state' and "
            f"'param_groups', got {got.__name__ if isinstance(got, type) else got}"
        )


def check_state_dict_format(
    opt: Optimizer, state_dict: Any, format_key: str, version: int, name: str
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` is a ``name`` state dict of ``version``.

    Shared by the ``load_state_dict`` of MicroAdam and Adapprox. A dict without
    ``format_key`` is another optimizer's: the message says whose when it can tell (one of
    :data:`FORMAT_KEYS`), else names the first parameter whose saved state has foreign
    keys and the hyperparameters ``name`` does not have, e.g. AdamW's ``amsgrad``.
    """
    check_is_state_dict(state_dict)
    groups = [g for g in state_dict["param_groups"] if isinstance(g, dict)]
    saved = state_dict.get(format_key)
    if saved == version:
        return
    if saved is not None:
        raise ValueError(
            f"Invalid state_dict: {format_key} is {saved!r}, but this version of microadam "
            f"reads {name} state dicts of format {version} only (was it saved by a "
            "different version of microadam?)"
        )

    def a(word: str) -> str:
        return f"{'an' if word[0] in 'AEIOU' else 'a'} {word}"

    for key, other in FORMAT_KEYS.items():
        if key != format_key and (key in state_dict or any(key in g for g in groups)):
            raise ValueError(
                f"Invalid state_dict: it looks like {a(other)} state dict (it has {key!r}, "
                f"no {format_key!r}), not {a(name)} one; load it into {other}"
            )
    details = []
    state = state_dict["state"]
    first = next(
        (
            (p, state[pid])
            for group, g in zip(opt.param_groups, groups, strict=False)
            for pid, p in zip(g.get("params", []), group["params"], strict=False)
            if isinstance(state.get(pid), dict) and state[pid]
        ),
        None,
    )
    if first is not None:
        details.append(f"the saved state of {opt._describe(first[0])} has keys {sorted(first[1])}")
    unknown = sorted({k for g in groups for k in g} - set(opt.defaults) - {"params"})
    if unknown:
        details.append(f"its param groups have settings {name} does not know: {unknown}")
    raise ValueError(
        f"Invalid state_dict: it has no {format_key!r}, so it looks like another optimizer's "
        f"state dict (such as torch.optim.AdamW's), not {a(name)} one"
        + (f": {'; '.join(details)}" if details else "")
        + f". Only state dicts saved by {name}.state_dict() can be loaded"
    )


def params_by_saved_id(
    param_groups: list[dict[str, Any]], saved_groups: list[Any]
) -> dict[Any, tuple[torch.Tensor, dict[str, Any]]]:
    """Saved parameter id -> (the optimizer's parameter in that place, its group's settings
    with the saved ones on top), pairing groups and parameters by position as
    ``Optimizer.load_state_dict`` does; malformed saved groups are skipped (the checks of
    ``load_state_dict`` report them)."""
    ids = {}
    for group, saved in zip(param_groups, saved_groups, strict=False):
        if not isinstance(saved, dict):
            continue
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        for pid, p in zip(saved.get("params", []), group["params"], strict=False):
            ids[pid] = (p, merged)
    return ids


def lift_format_key(state_dict: dict[str, Any], key: str) -> dict[str, Any]:
    """``state_dict`` with the format version ``key`` at the top level and not in the param
    groups. ``state_dict()`` also writes it into every group because
    ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and ``param_groups``;
    a copy is made where something changes."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return state_dict
    if key not in state_dict and groups:
        versions = {g.get(key) for g in groups}
        if len(versions) == 1 and None not in versions:
            state_dict = {**state_dict, key: versions.pop()}
    if any(key in g for g in groups):
        groups = [{k: v for k, v in g.items() if k != key} for g in groups]
        state_dict = {**state_dict, "param_groups": groups}
    return state_dict
