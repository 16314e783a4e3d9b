"""What each optimizer of a bench runs with: its hyperparameters and its lr grid.

The optimizers are written as registry names or ``NAME[KEY=VALUE,...]`` variants (e.g.
``"microadam[density=0.1]"``, see :func:`parse_optimizer`); ``--hp`` overrides use the same
``KEY=VALUE`` syntax (:func:`parse_assignments`). Each optimizer's lr grid is a few
multiples (:data:`LR_FACTORS`) of a per-workload base rate (:data:`BASE_LR`); the other
hyperparameters are the bench's (:func:`base_hyperparameters`). User-given ones are checked
against what the optimizer takes (:func:`check_hyperparameters`).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from microadam.optim.registry import GALORE_KEYS, get_spec

__all__ = [
    "BASE_LR",
    "DEFAULT_OPTIMIZERS",
    "FINETUNE_PEERS",
    "LR_FACTORS",
    "MUON_ADAMW_RATIO",
    "base_hyperparameters",
    "check_hyperparameters",
    "default_optimizers",
    "grid_hyperparameters",
    "lr_grid",
    "lr_values",
    "parse_assignments",
    "parse_optimizer",
    "parse_optimizers",
    "split_top_level",
]

# Centre of each optimizer's lr grid, by workload (name, else kind). Closure-based methods:
# the initial step of the line search. Muon: its matrices' lr; the AdamW part's lr scales with it.
BASE_LR: dict[str, dict[str, float]] = {
    "function": {
        "sgd": 1e-3, "rmsprop": 1e-2, "adagrad": 1.0, "adadelta": 1.0, "adam": 0.1,
        "adamw": 0.1, "amsgrad": 0.1, "adafactor": 0.1, "microadam": 3e-2,
        "adapprox": 0.1, "muon": 0.1, "adamw8bit": 0.1, "adamw4bit": 0.1,
        "galore_adamw": 0.1, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    # The quadratic's curvature is at most 1, Rosenbrock's over 1000 along the valley walls.
    "quadratic": {
        "sgd": 0.3, "rmsprop": 1e-2, "adagrad": 1.0, "adadelta": 1.0, "adam": 0.1,
        "adamw": 0.1, "amsgrad": 0.1, "adafactor": 0.1, "microadam": 3e-2,
        "adapprox": 0.1, "muon": 0.1, "adamw8bit": 0.1, "adamw4bit": 0.1,
        "galore_adamw": 0.1, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    "tabular": {
        "sgd": 3e-2, "rmsprop": 1e-3, "adagrad": 3e-2, "adadelta": 1.0, "adam": 3e-3,
        "adamw": 3e-3, "amsgrad": 3e-3, "adafactor": 1e-2, "microadam": 3e-3,
        "adapprox": 3e-3, "muon": 2e-2, "adamw8bit": 3e-3, "adamw4bit": 3e-3,
        "galore_adamw": 3e-3, "lbfgs": 1.0, "newton": 1.0, "bfgs": 1.0,
    },
    # The Adam family at 1e-3: with 3e-3 at the centre, the full and the quick lm runs both
    # chose the grid's lowest point (1e-3) for MicroAdam and AdamW alike.
    "lm": {
        "sgd": 0.3, "rmsprop": 1e-3, "adagrad": 1e-2, "adadelta": 1.0, "adam": 1e-3,
        "adamw": 1e-3, "amsgrad": 1e-3, "adafactor": 1e-2, "microadam": 1e-3,
        "adapprox": 1e-3, "muon": 2e-2, "adamw8bit": 1e-3, "adamw4bit": 1e-3,
        "galore_adamw": 1e-3,
    },
    # Fine-tuning from a pretrained model: the same centres; the full run's 5-point grid
    # spans 1.1e-4 to 9e-3 for the Adam family.
    "finetune": {
        "sgd": 0.1, "rmsprop": 1e-3, "adagrad": 1e-2, "adadelta": 1.0, "adam": 1e-3,
        "adamw": 1e-3, "amsgrad": 1e-3, "adafactor": 3e-3, "microadam": 1e-3,
        "adapprox": 1e-3, "muon": 2e-2, "adamw8bit": 1e-3, "adamw4bit": 1e-3,
        "galore_adamw": 1e-3,
    },
}  # fmt: skip

# Muon's AdamW part (embeddings, head, vectors) relative to its matrices' lr.
MUON_ADAMW_RATIO = 0.15

# Multipliers of the base lr for a grid of n points.
LR_FACTORS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1 / 3, 1.0),
    3: (1 / 3, 1.0, 3.0),
    4: (1 / 9, 1 / 3, 1.0, 3.0),
    5: (1 / 9, 1 / 3, 1.0, 3.0, 9.0),
}

DEFAULT_OPTIMIZERS: dict[str, tuple[str, ...]] = {
    "function": ("microadam", "adam", "sgd", "adagrad", "lbfgs", "newton"),
    "tabular": ("microadam", "adamw", "sgd", "adafactor", "lbfgs"),
    "lm": ("microadam", "adamw", "adafactor"),
    # The memory-saving peers are added where installed (see default_optimizers).
    "finetune": ("microadam", "microadam[density=0.1]", "adamw", "adafactor"),
}
# Optional peers a fine-tuning bench compares where their packages are installed.
FINETUNE_PEERS = ("adamw8bit", "adamw4bit", "galore_adamw")


def default_optimizers(kind: str) -> list[str]:
    """The optimizers a workload of ``kind`` compares unless told otherwise."""
    from microadam.optim.registry import list_optimizers

    names = list(DEFAULT_OPTIMIZERS[kind])
    if kind == "finetune":
        installed = set(list_optimizers())
        names += [n for n in FINETUNE_PEERS if n in installed]
    return names


def _nice(x: float) -> float:
    """Round to two significant digits (3e-3 / 3 is 1e-3, not 0.0009999...)."""
    return float(f"{x:.2g}")


def base_hyperparameters(name: str, kind: str) -> dict[str, Any]:
    """The bench's hyperparameters for optimizer ``name`` on a workload of ``kind`` (a
    workload name with its own row in :data:`BASE_LR`, or its kind)."""
    spec = get_spec(name)
    hp: dict[str, Any] = {"lr": BASE_LR.get(kind, {}).get(spec.name, 1e-3)}
    params = inspect.signature(spec.load()).parameters
    if "weight_decay" in params:
        hp["weight_decay"] = 0.0
    if spec.name == "sgd":
        hp["momentum"] = 0.9
    if spec.name == "muon":
        hp["adamw_lr"] = _nice(hp["lr"] * MUON_ADAMW_RATIO)
    if spec.needs_closure:
        hp["max_iter"] = 1
        if spec.name == "lbfgs":
            # torch's LBFGS gives its line search max_eval - 1 evaluations: 25, not 0.
            hp.update(line_search_fn="strong_wolfe", max_eval=26)
    return hp


def lr_values(
    name: str, kind: str, factors: tuple[float, ...] | None, lrs: tuple[float, ...] | None
) -> list[float]:
    """The lr grid of optimizer ``name``: explicit ``lrs``, or ``factors`` x its base lr."""
    if lrs:
        return [float(x) for x in lrs]
    base = base_hyperparameters(name, kind)["lr"]
    return [_nice(base * f) for f in (factors or (1.0,))]


def lr_grid(
    name: str,
    kind: str,
    factors: tuple[float, ...] | None,
    lrs: tuple[float, ...] | None,
    overrides: dict[str, Any],
) -> list[float]:
    """:func:`lr_values`, unless ``overrides`` fix the lr: then that one value."""
    grid = lr_values(name, kind, factors, lrs)
    if "lr" in overrides:
        grid = [float(overrides["lr"])]
    return grid


def grid_hyperparameters(
    name: str, kind: str, lr: float, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The hyperparameters of optimizer ``name`` at the point ``lr`` of its grid: the
    bench's, with Muon's AdamW lr following ``lr``, then ``overrides``, then ``lr``."""
    hp = base_hyperparameters(name, kind)
    if "adamw_lr" in hp:
        hp["adamw_lr"] = _nice(lr * MUON_ADAMW_RATIO)
    hp.update(overrides)
    hp["lr"] = lr
    return hp


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,b=(2, 3)"`` -> ``["a=1", "b=(2, 3)"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_assignments(text: str, where: str) -> dict[str, Any]:
    """``"density=0.05,betas=(0.9, 0.99)"`` -> ``{"density": 0.05, "betas": (0.9, 0.99)}``.

    Values are Python literals where they parse as one, strings otherwise.
    """
    out: dict[str, Any] = {}
    for pair in split_top_level(text):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"Invalid {where}: {pair!r} is not KEY=VALUE")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _dtype(text: str) -> torch.dtype | None:
    """``"float32"`` or ``"torch.float32"`` -> ``torch.float32``; None if no dtype is named."""
    value = getattr(torch, text.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def _takes_dtype(param: inspect.Parameter) -> bool:
    return isinstance(param.default, torch.dtype) or "dtype" in str(param.annotation)


def check_hyperparameters(name: str, hp: dict[str, Any], where: str) -> dict[str, Any]:
    """``hp`` for optimizer ``name``, checked against the keywords it takes, with dtype names
    (``float32``, ``torch.bfloat16``, ...) turned into torch dtypes for the keywords that take
    one (a command line only gives strings). ``ValueError`` naming ``where`` otherwise."""
    spec = get_spec(name)
    params = inspect.signature(spec.load()).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    takes = [k for k, p in params.items() if k != "params" and p.kind not in variadic]
    if spec.grouping == "galore":
        takes += GALORE_KEYS  # create_optimizer builds GaLore's groups from these
    unknown = [k for k in hp if k not in takes]
    if unknown and all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ValueError(
            f"Invalid {where}: {spec.name} has no hyperparameter "
            f"{', '.join(map(repr, unknown))} (it takes {', '.join(takes)})"
        )
    out = dict(hp)
    for key, value in hp.items():
        if key in params and _takes_dtype(params[key]) and isinstance(value, str):
            out[key] = _dtype(value)
            if out[key] is None:
                raise ValueError(
                    f"Invalid {where}: {key}={value!r} is not a torch dtype (e.g. float32, "
                    "bfloat16, float16)"
                )
    return out


def parse_optimizer(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"microadam[density=0.1]"`` -> ``("microadam[density=0.1]", "microadam", {...})``.

    A registry name, optionally with bracketed hyperparameters that make it a variant with
    its own label (so that one optimizer can be compared with itself); the hyperparameters
    are checked by :func:`check_hyperparameters`.
    """
    text = text.strip()
    base, bracket, rest = text.partition("[")
    spec = get_spec(base.strip())
    if not bracket:
        return spec.name, spec.name, {}
    if not rest.endswith("]") or not rest[:-1].strip():
        raise ValueError(f"Invalid optimizer {text!r} (expected NAME or NAME[KEY=VALUE,...])")
    where = f"optimizer {text!r}"
    overrides = check_hyperparameters(spec.name, parse_assignments(rest[:-1], where), where)
    return f"{spec.name}[{rest[:-1].strip()}]", spec.name, overrides


def parse_optimizers(texts: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """:func:`parse_optimizer` of each, the labels checked unique."""
    parsed = [parse_optimizer(t) for t in texts]
    labels = [label for label, _, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Invalid optimizers: {labels} (a name appears twice)")
    return parsed
