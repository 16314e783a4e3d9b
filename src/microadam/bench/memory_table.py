"""Optimizer-state bytes per parameter of every registry optimizer on the ``lm`` model.

Measured with :func:`microadam.memory.state_bytes` after one step with random gradients
(state is created lazily, so one step builds all of it). Closure-based methods are not run
on the language model (see :class:`microadam.bench.lm.LMWorkload`); their row gives the
registry's formula evaluated at the model's size instead.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MODEL_SIZES", "MemoryTable", "memory_table"]

# The lm model at three sizes (context 256): 0.89M, 3.36M and 10.94M parameters.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "small": dict(d_model=128, n_layer=4, n_head=4),
    "medium": dict(d_model=256, n_layer=4, n_head=4),
    "large": dict(d_model=384, n_layer=6, n_head=6),
}


@dataclass
class MemoryTable:
    """``values[name][size]``: bytes per parameter (``None``: not measured, see ``notes``)."""

    sizes: dict[str, int]
    values: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        head = [f"{s} ({n / 1e6:.2f}M)" for s, n in self.sizes.items()]
        lines = [
            "| optimizer | " + " | ".join(head) + " | note |",
            "|---|" + "---|" * (len(head) + 1),
        ]
        for name, row in self.values.items():
            cells = ["-" if v is None else f"{v:.3f}" for v in row.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {self.notes.get(name, '')} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes, "values": self.values, "notes": self.notes}


def _closure_note(name: str, sizes: dict[str, int]) -> str:
    n = max(sizes.values())
    if name == "lbfgs":
        return (
            "not run (needs a full-batch closure); 8 x history_size + 12 once its history "
            "is full: 812 at the default history_size=100"
        )
    if name == "newton":
        return (
            "not run: its exact Hessian is limited to 5,000 parameters; a dense Hessian "
            f"would be 8n = {8 * n / 1e6:.0f}M bytes per parameter at n = {n / 1e6:.1f}M"
        )
    return (
        f"not run: a dense n x n inverse Hessian, 8n = {8 * n / 1e6:.0f}M bytes per "
        f"parameter at n = {n / 1e6:.1f}M"
    )


def memory_table(
    names: list[str] | None = None,
    sizes: dict[str, dict[str, int]] | None = None,
    context: int = 256,
) -> MemoryTable:
    """Measure every optimizer of ``names`` (default: all installed) at every model size."""
    from microadam.bench.models import TinyGPT
    from microadam.memory import state_bytes
    from microadam.optim.registry import create_optimizer, get_spec, list_optimizers

    sizes = sizes or MODEL_SIZES
    models = {}
    for label, kw in sizes.items():
        torch.manual_seed(0)
        models[label] = TinyGPT(context=context, **kw)
    table = MemoryTable({k: sum(p.numel() for p in m.parameters()) for k, m in models.items()})
    for name in names or list_optimizers():
        spec = get_spec(name)
        row: dict[str, float | None] = {}
        if spec.needs_closure:
            table.values[spec.name] = dict.fromkeys(models)
            table.notes[spec.name] = _closure_note(spec.name, table.sizes)
            continue
        for label, model in models.items():
            try:
                with warnings.catch_warnings():  # peers' deprecation and compile notices
                    warnings.simplefilter("ignore")
                    opt = create_optimizer(spec.name, model)
                    for p in model.parameters():
                        p.grad = torch.randn_like(p)
                    opt.step()
                row[label] = state_bytes(opt) / table.sizes[label]
            except Exception as err:  # a peer package that fails on this machine
                row[label] = None
                table.notes[spec.name] = f"failed: {type(err).__name__}: {err}"[:200]
            finally:
                for p in model.parameters():
                    p.grad = None
            opt = None
        table.values[spec.name] = row
    return table
