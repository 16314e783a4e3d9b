"""Bad input gets one error wording across the package's optimizers, naming the argument
and the value, and ``create_optimizer`` refuses what ``torch.optim`` refuses or would
misread as parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from microadam import Adapprox, MicroAdam, create_optimizer
from microadam.optim import Muon

# Each builds an optimizer of 2-D parameters from the shared keyword arguments.
BUILDERS = {
    "MicroAdam": lambda p, **kw: MicroAdam(p, **kw),
    "Adapprox": lambda p, **kw: Adapprox(p, **kw),
    "Muon (AdamW group)": lambda p, **kw: Muon([{"params": p, "use_muon": False, **kw}]),
    "Muon": lambda p, **kw: Muon(p, **{k: v for k, v in kw.items() if k != "betas"}),
}

SHARED = [
    (dict(lr=-1.0), "Invalid lr: -1.0 (expected lr >= 0)"),
    (dict(lr="1e-3"), "Invalid lr: '1e-3' (expected a number, lr >= 0; got str)"),
    (
        dict(lr=torch.tensor([1e-3, 1e-3])),
        "Invalid lr: tensor lr must have one element, got shape (2,)",
    ),
    (dict(weight_decay=-0.5), "Invalid weight_decay: -0.5 (expected weight_decay >= 0)"),
    (
        dict(weight_decay=None),
        "Invalid weight_decay: None (expected a number, weight_decay >= 0; got NoneType)",
    ),
]
BETAS = [
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0 (expected {first})"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1 (expected 0 <= beta < 1)"),
    (
        dict(betas=(0.9, "0.99")),
        "Invalid beta parameter at index 1: '0.99' (expected a number, 0 <= beta < 1; got str)",
    ),
    (dict(betas=(0.9,)), "Invalid betas: (0.9,) (expected a pair of floats)"),
]


def _params():
    return [nn.Parameter(torch.zeros(3, 4))]


@pytest.mark.parametrize(("kwargs", "message"), SHARED)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_shared_hyperparameters_have_one_wording(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        BUILDERS[name](_params(), **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(("kwargs", "message"), BETAS)
@pytest.mark.parametrize("name", ["MicroAdam", "Adapprox", "Muon (AdamW group)"])
def test_betas_have_one_wording(name, kwargs, message):
    # Adapprox alone can switch its first moment off, so it alone admits None there.
    first = "None or 0 <= beta < 1" if name == "Adapprox" else "0 <= beta < 1"
    with pytest.raises(ValueError) as info:
        BUILDERS[name](_params(), **kwargs)
    assert str(info.value) == message.format(first=first)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(density="0.1"),
            "Invalid density: '0.1' (expected a number, 0 < density <= 1; got str)",
        ),
        (dict(density=0.0), "Invalid density: 0.0 (expected 0 < density <= 1)"),
        (dict(window_size=2.0), "Invalid window_size: 2.0 (expected an integer >= 1)"),
        (dict(maximize=1), "Invalid maximize: 1 (expected True or False)"),
    ],
)
def test_micro_adam_wrong_types_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as info:
        MicroAdam(_params(), **kwargs)
    assert str(info.value) == message


EXPECTED = "an nn.Module, an iterable of tensors or an iterable of param groups (dicts)"


@pytest.mark.parametrize(
    ("params", "got"),
    [
        (
            nn.Parameter(torch.zeros(3, 2)),
            "a torch.FloatTensor; wrap a single parameter in a list: [param]",
        ),
        (
            torch.zeros(3, 2, requires_grad=True),
            "a torch.FloatTensor; wrap a single parameter in a list: [param]",
        ),
        (
            {"params": [nn.Parameter(torch.zeros(2))]},
            "a dict; wrap a single param group in a list: [group]",
        ),
        (None, "NoneType"),
        (3, "int"),
    ],
    ids=["parameter", "tensor", "dict", "None", "int"],
)
@pytest.mark.parametrize("name", ["adamw", "microadam", "muon", "newton"])
def test_create_optimizer_refuses_what_is_not_parameters(name, params, got):
    with pytest.raises(TypeError) as info:
        create_optimizer(name, params)
    assert str(info.value) == f"params_or_model should be {EXPECTED}, but got {got}"


def test_create_optimizer_takes_a_generator_of_parameters():
    model = nn.Linear(3, 2)
    opt = create_optimizer("microadam", (p for p in model.parameters()))
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
