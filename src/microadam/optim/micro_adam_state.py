"""MicroAdam's per-parameter state, defined once.

:data:`STATE_LAYOUT` is the only description of what MicroAdam keeps for a parameter:
each entry gives a state key, its dtype, its shape rule, where it lives, when it exists
and its size in bytes. The optimizer creates the state from it and checks loaded and resumed
state against it before any path (eager, compiled, Triton, C++) sees it; the docstring's
memory list and :func:`state_nbytes` are computed from it (tests compare the latter with
:func:`microadam.memory.state_bytes`, which counts the tensors actually held).

Sizes are those of the tensor the state belongs to: for a DTensor parameter (FSDP2), its
local shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from microadam.compress.quant import packed_numel
from microadam.compress.topk import topk_layout

__all__ = [
    "CPU_KEYS",
    "LAYOUT_KEYS",
    "STATE_LAYOUT",
    "StateEntry",
    "StateSizes",
    "expected_state",
    "memory_formula",
    "state_nbytes",
    "state_sizes",
]


@dataclass(frozen=True)
class StateSizes:
    """The numbers the state's shapes are made of, for ``d`` elements under one group's
    settings: ``m`` window rows of ``k`` kept entries, ``buckets`` error-feedback buckets
    of ``Q`` elements and ``packed`` bytes of error-feedback codes."""

    d: int
    m: int
    k: int
    buckets: int
    packed: int


def state_sizes(d: int, group: Mapping[str, Any]) -> StateSizes:
    return StateSizes(
        d=d,
        m=group["window_size"],
        k=topk_layout(d, group["topk_block_size"], group["density"]).k,
        buckets=-(-d // group["quant_block_size"]),
        packed=packed_numel(d, group["quant_bits"]),
    )


@dataclass(frozen=True)
class StateEntry:
    """One state tensor of a MicroAdam parameter.

    Attributes:
        key: the key in ``optimizer.state[p]``.
        dtype: its dtype; ``None`` means the group's ``value_dtype``.
        shape: its shape from the sizes.
        on_cpu: kept on the CPU whatever the parameter's device (read on the host at
            every step).
        present: whether a group's settings have it.
        formula: its size in bytes, for the docs (``d``, ``m``, ``k``, ``Q``).
        meaning: what it holds.
    """

    key: str
    dtype: torch.dtype | None
    shape: Callable[[StateSizes], tuple[int, ...]]
    on_cpu: bool
    present: Callable[[Mapping[str, Any]], bool]
    formula: str
    meaning: str

    def dtype_for(self, group: Mapping[str, Any]) -> torch.dtype:
        return group["value_dtype"] if self.dtype is None else self.dtype


def _always(group: Mapping[str, Any]) -> bool:
    return True


def _with_error_feedback(group: Mapping[str, Any]) -> bool:
    return bool(group["error_feedback"])


def _stochastic(group: Mapping[str, Any]) -> bool:
    return group["rounding"] == "stochastic"


STATE_LAYOUT: tuple[StateEntry, ...] = (
    StateEntry(
        "step", torch.float32, lambda s: (), True, _always, "4",
        "steps taken, a float32 count as torch.optim keeps it (exact to 2^24)",
    ),
    StateEntry(
        "window_indices", torch.int16, lambda s: (s.m, s.k), False, _always, "2 m k",
        "indices of the kept entries within their Top-K block, one window row per step",
    ),
    StateEntry(
        "window_values", None, lambda s: (s.m, s.k), False, _always,
        "2 m k (bf16)",
        "the kept values of the corrected gradient, one window row per step",
    ),
    StateEntry(
        "ef_codes", torch.uint8, lambda s: (s.packed,), False, _with_error_feedback,
        "d / 2 (4 bits), d (8 bits)",
        "what Top-K dropped, quantized per bucket of Q elements",
    ),
    StateEntry(
        "ef_min", torch.bfloat16, lambda s: (s.buckets,), False, _with_error_feedback,
        "2 d / Q", "each bucket's minimum",
    ),
    StateEntry(
        "ef_max", torch.bfloat16, lambda s: (s.buckets,), False, _with_error_feedback,
        "2 d / Q", "each bucket's maximum",
    ),
    StateEntry(
        "rng_seed", torch.int64, lambda s: (), True, _stochastic, "8",
        "the seed of the counter-based rounding noise",
    ),
)  # fmt: skip

# The state kept on the CPU whatever the parameter's device.
CPU_KEYS = tuple(e.key for e in STATE_LAYOUT if e.on_cpu)

# The group settings that decide which state tensors a parameter has and their shapes and
# dtypes (what :func:`state_sizes`, ``StateEntry.dtype_for`` and the entries' ``present``
# read), so the settings a saved state fixes. ``rounding`` is not one of them: it only adds
# ``rng_seed``, which is drawn at the next step when it is switched on later.
LAYOUT_KEYS = (
    "window_size",
    "density",
    "topk_block_size",
    "quant_block_size",
    "quant_bits",
    "error_feedback",
    "value_dtype",
)


def expected_state(
    d: int, group: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
    """``key -> (shape, dtype, on_cpu)`` of every state tensor a parameter of ``d``
    elements has under ``group``'s settings."""
    sizes = state_sizes(d, group)
    return {
        e.key: (e.shape(sizes), e.dtype_for(group), e.on_cpu)
        for e in STATE_LAYOUT
        if e.present(group)
    }


def state_nbytes(d: int, group: Mapping[str, Any]) -> int:
    """Bytes of state of a parameter of ``d`` elements under ``group``'s settings."""
    return sum(
        math.prod(shape) * dtype.itemsize for shape, dtype, _ in expected_state(d, group).values()
    )


def memory_formula() -> str:
    """The docstring's list of state tensors, one bullet each, from :data:`STATE_LAYOUT`."""
    lines = []
    for e in STATE_LAYOUT:
        dtype = "value_dtype" if e.dtype is None else str(e.dtype).removeprefix("torch.")
        when = {_always: "", _with_error_feedback: ", error feedback only"}.get(
            e.present, ", stochastic rounding only"
        )
        lines.append(f"* ``{e.key}`` ({dtype}{when}): {e.formula} bytes, {e.meaning}")
    return "\n".join(lines)
