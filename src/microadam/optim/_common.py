"""Pieces every optimizer of this package's own shares: finding the parameters to step and
naming a parameter in an error message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LazyText", "describe_param", "params_with_grad"]


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
