"""The experiments: the report's settings, its seven figures and the variants they compare.

The classifier figures (1 to 5) are panels, each a setup of :mod:`microadam.bench.classic`
(a data set and its model) with the optimizer variants it compares; figure 6 is the
MicroAdam paper's Rosenbrock toy and figure 7 the state-bytes table of every optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from microadam.bench.classic import BC, BC_RAW, IRIS, Setup, Variant

__all__ = [
    "ADAM",
    "ADAM_99",
    "ADAM_FAST",
    "D1",
    "D1_EF",
    "D1_EF8",
    "D1_EF_99",
    "D10",
    "D100",
    "D100_99",
    "D100_SLOW",
    "EPOCHS",
    "FIGURES",
    "PANELS",
    "QUICK_EPOCHS",
    "QUICK_SEEDS",
    "ROSENBROCK_LR",
    "ROSENBROCK_STEPS",
    "SEEDS",
    "WINDOW",
    "Panel",
    "rosenbrock_optimizers",
    "step_ratio",
    "steps_per_epoch",
]

EPOCHS, QUICK_EPOCHS = 1000, 50
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)
WINDOW = 10  # MicroAdam's default window_size, as in the report
ROSENBROCK_STEPS, ROSENBROCK_LR = 1000, 0.03

FIGURES = {
    1: "Breast cancer without error feedback at density 100%, 10% and 1%",
    2: "Error feedback against none against dense, at density 1%, on both data sets",
    3: "Sparser densities with error feedback",
    4: "Adam against MicroAdam with the same betas, over the 1000-epoch horizon",
    5: "Unnormalized breast-cancer features; 8-bit against 4-bit error feedback",
    6: "The MicroAdam paper's Rosenbrock toy: Adam, Top-K Adam, Top-K Adam with error feedback",
    7: "Optimizer-state bytes per parameter of every registry optimizer on the lm model",
}


def _micro(density: float, ef: bool = False, bits: int = 4, label: str = "", **kw: Any) -> Variant:
    name = label or (
        f"MicroAdam {100 * density:g}%"
        + ("" if density == 1 else (", EF" + (" 8-bit" if bits == 8 else "") if ef else ", no EF"))
    )
    return Variant(name, "microadam", density, ef, bits, **kw)


ADAM = Variant("Adam", "adam")
ADAM_99 = Variant("Adam", "adam", betas=(0.9, 0.99))
ADAM_FAST = Variant("Adam, lr 6.5e-3", "adam", lr=6.5e-3)
D100, D10, D1 = _micro(1.0), _micro(0.1), _micro(0.01)
D10_EF, D1_EF, D05_EF, D01_EF = (_micro(d, True) for d in (0.1, 0.01, 0.005, 0.001))
D1_EF8 = _micro(0.01, True, 8)
D100_SLOW = _micro(1.0, label="MicroAdam 100%, lr 1e-3 / 6.5", lr=1e-3 / 6.5)
D100_99 = replace(D100, betas=(0.9, 0.99))
D1_EF_99 = replace(D1_EF, betas=(0.9, 0.99))


@dataclass(frozen=True)
class Panel:
    title: str
    setup: Setup
    variants: tuple[Variant, ...]


PANELS: dict[int, tuple[Panel, ...]] = {
    1: (Panel("breast cancer (standardized), no error feedback", BC, (ADAM, D100, D10, D1)),),
    2: (
        Panel("iris (linear layer, raw features)", IRIS, (ADAM, D100, D1_EF, D1)),
        Panel("breast cancer (30-8-2, standardized)", BC, (ADAM, D100, D1_EF, D1)),
    ),
    3: (
        Panel(
            "breast cancer (standardized), with error feedback", BC, (D10_EF, D1_EF, D05_EF, D01_EF)
        ),
    ),
    4: (
        Panel("betas (0.9, 0.999)", BC, (ADAM, D100, D1_EF, D100_SLOW, ADAM_FAST)),
        Panel("betas (0.9, 0.99)", BC, (ADAM_99, D100_99, D1_EF_99)),
    ),
    5: (
        Panel("breast cancer, raw (unnormalized) features", BC_RAW, (ADAM, D1_EF, D1_EF8)),
        Panel("breast cancer, standardized features", BC, (ADAM, D1_EF, D1_EF8)),
    ),
}


def steps_per_epoch(setup: Setup) -> int:
    """Batches of 16 over the 80% training split, the last short batch kept."""
    n = {"iris": 120, "breast-cancer": 455}[setup.dataset]
    return math.ceil(n / 16)


def step_ratio(t: int, betas: tuple[float, float] = (0.9, 0.999), m: int = WINDOW) -> float:
    """MicroAdam's step over Adam's at step ``t`` for a coordinate kept at every step with a
    constant gradient: both bias-correct with the full ``t``, but MicroAdam's window sums
    only the last ``m`` gradients, so ``(1 - b1^m)/(1 - b1^t) / sqrt((1 - b2^m)/(1 - b2^t))``
    (``m`` replaced by ``t`` while ``t <= m``, where the two agree)."""
    b1, b2 = betas
    k = min(t, m)
    return ((1 - b1**k) / (1 - b1**t)) / math.sqrt((1 - b2**k) / (1 - b2**t))


def rosenbrock_optimizers(steps: int) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Figure 6's optimizers by name, each made from a parameter list; ``steps``: the run's."""
    from microadam.optim.micro_adam import MicroAdam

    lr = ROSENBROCK_LR
    # Top-K Adam: MicroAdam keeping 1 of the 2 coordinates, with a window as long as the run
    # (its moments are then Adam's dense moments of the sparse gradients) and float64 values.
    long = dict(density=0.5, window_size=steps, value_dtype=torch.float64)
    return {
        "Adam": lambda p: torch.optim.Adam(p, lr=lr),
        "Top-K Adam (k=1 of 2)": lambda p: MicroAdam(p, lr=lr, error_feedback=False, **long),
        "Top-K Adam + error feedback": lambda p: MicroAdam(p, lr=lr, error_feedback=True, **long),
        f"MicroAdam (k=1 of 2, window {WINDOW}, 4-bit EF)": lambda p: MicroAdam(
            p, lr=lr, density=0.5
        ),
    }
