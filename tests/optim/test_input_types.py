"""Hyperparameters of the wrong type get a message that says what was wrong: a string where a
number belongs is named as a string (quoted, with its type), never as a number out of range.
One table for MicroAdam, Adapprox, Muon, Newton and BFGS."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from microadam import BFGS, Adapprox, MicroAdam, Muon, Newton

CLASSES = {
    "MicroAdam": MicroAdam,
    "Adapprox": Adapprox,
    "Muon": Muon,
    "Newton": Newton,
    "BFGS": BFGS,
}


def number(name: str, value: object, rule: str) -> str:
    return f"Invalid {name}: {value!r} (expected a number, {rule}; got {type(value).__name__})"


def beta(value: object, rule: str = "0 <= beta < 1") -> str:
    kind = type(value).__name__
    return f"Invalid beta parameter at index 0: {value!r} (expected a number, {rule}; got {kind})"


# (class, keyword, value, the whole message)
CASES = [
    ("MicroAdam", "density", "0.1", number("density", "0.1", "0 < density <= 1")),
    ("MicroAdam", "density", None, number("density", None, "0 < density <= 1")),
    ("MicroAdam", "lr", "1e-3", number("lr", "1e-3", "lr >= 0")),
    ("MicroAdam", "betas", ("0.9", 0.999), beta("0.9")),
    ("MicroAdam", "betas", "0.9", "Invalid betas: '0.9' (expected a pair of floats)"),
    ("MicroAdam", "window_size", 3.0, "Invalid window_size: 3.0 (expected an integer >= 1)"),
    ("MicroAdam", "eps", None, number("eps", None, "eps >= 0")),
    ("MicroAdam", "weight_decay", "0", number("weight_decay", "0", "weight_decay >= 0")),
    (
        "MicroAdam",
        "topk_block_size",
        "4096",
        "Invalid topk_block_size: '4096' (expected an integer, 1 <= topk_block_size <= 32768)",
    ),
    (
        "MicroAdam",
        "quant_block_size",
        256.0,
        "Invalid quant_block_size: 256.0 (expected an integer >= 1)",
    ),
    ("MicroAdam", "quant_bits", "4", "Invalid quant_bits: '4' (expected 4 or 8)"),
    ("MicroAdam", "quant_bits", 4.0, "Invalid quant_bits: 4.0 (expected 4 or 8)"),
    (
        "MicroAdam",
        "error_feedback",
        "yes",
        "Invalid error_feedback: 'yes' (expected True or False)",
    ),
    (
        "MicroAdam",
        "value_dtype",
        "bfloat16",
        "Invalid value_dtype: 'bfloat16' (expected a floating torch.dtype)",
    ),
    ("MicroAdam", "rounding", None, "Invalid rounding: None (expected 'nearest' or 'stochastic')"),
    ("MicroAdam", "maximize", 1, "Invalid maximize: 1 (expected True or False)"),
    ("Adapprox", "lr", "1e-3", number("lr", "1e-3", "lr >= 0")),
    ("Adapprox", "betas", ("0.9", 0.999), beta("0.9", "None or 0 <= beta < 1")),
    ("Adapprox", "eps", None, number("eps", None, "eps > 0")),
    ("Adapprox", "min_rank", 3.0, "Invalid min_rank: 3.0 (expected an integer >= 1)"),
    ("Adapprox", "max_rank", "32", "Invalid max_rank: '32' (expected an integer >= min_rank = 1)"),
    (
        "Adapprox",
        "rank_tolerance",
        "0.1",
        number("rank_tolerance", "0.1", "0 <= rank_tolerance <= 1"),
    ),
    (
        "Adapprox",
        "clip_threshold",
        "1.0",
        number("clip_threshold", "1.0", "None or clip_threshold > 0"),
    ),
    (
        "Adapprox",
        "power_iterations",
        1.0,
        "Invalid power_iterations: 1.0 (expected an integer >= 0)",
    ),
    (
        "Adapprox",
        "second_moment_floor",
        1,
        "Invalid second_moment_floor: 1 (expected 'gradient' or 'zero')",
    ),
    ("Muon", "lr", "1e-3", number("lr", "1e-3", "lr >= 0")),
    ("Muon", "momentum", "0.95", number("momentum", "0.95", "0 <= momentum < 1")),
    ("Muon", "eps", None, number("eps", None, "eps > 0")),
    ("Muon", "ns_steps", 3.0, "Invalid ns_steps: 3.0 (expected an integer >= 1)"),
    (
        "Muon",
        "ns_coefficients",
        ("3.4", -4.7, 2.0),
        "Invalid ns_coefficients: ('3.4', -4.7, 2.0) (expected a tuple of three floats)",
    ),
    ("Muon", "adamw_lr", "3e-4", number("adamw_lr", "3e-4", "adamw_lr >= 0")),
    ("Muon", "adamw_betas", ("0.9", 0.95), beta("0.9")),
    ("Muon", "adamw_eps", None, number("adamw_eps", None, "adamw_eps >= 0")),
    ("Muon", "nesterov", "yes", "Invalid nesterov: 'yes' (expected True or False)"),
    ("Newton", "damping", "0.1", number("damping", "0.1", "damping >= 0")),
    (
        "Newton",
        "max_hessian_size",
        "10",
        "Invalid max_hessian_size: '10' (expected max_hessian_size >= 1)",
    ),
    ("Newton", "cg_max_iter", 2.0, "Invalid cg_max_iter: 2.0 (expected None or cg_max_iter >= 1)"),
    ("BFGS", "initial_scaling", "yes", "Invalid initial_scaling: 'yes' (expected True or False)"),
]
# Newton's and BFGS's lr, max_iter and tolerances (line_search.py, the shared checks).
CASES += [
    case
    for cls in ("Newton", "BFGS")
    for case in (
        (cls, "lr", "1e-3", number("lr", "1e-3", "lr > 0")),
        (cls, "max_iter", 3.0, "Invalid max_iter: 3.0 (expected an integer >= 1)"),
        (cls, "tolerance_grad", None, number("tolerance_grad", None, "tolerance_grad >= 0")),
    )
]


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(4, 3))]


@pytest.mark.parametrize(
    ("cls", "key", "value", "message"),
    CASES,
    ids=[f"{c}-{k}={v!r}" for c, k, v, _ in CASES],
)
def test_wrong_types_get_the_right_message(cls, key, value, message):
    with pytest.raises(ValueError) as info:
        CLASSES[cls](_params(), **{key: value})
    assert str(info.value) == message


@pytest.mark.parametrize("cls", ["MicroAdam", "Adapprox", "Muon"])
def test_a_string_in_a_param_group_is_refused_as_in_the_constructor(cls):
    groups = [{"params": _params(), "lr": "1e-3"}]
    with pytest.raises(ValueError, match=re.escape(number("lr", "1e-3", "lr >= 0"))):
        CLASSES[cls](groups)
