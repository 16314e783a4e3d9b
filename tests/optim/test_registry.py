"""The registry, tested through one table of optimizer specs.

Every name of ``list_optimizers()`` has exactly one row of ``TABLE`` (a test fails when a
name has none): its hyperparameters for the generic tests, whether it needs a closure, its
step budget and tolerance on Rosenbrock and on an ill-conditioned quadratic, and the few
things that do not apply to it, each with its reason. The generic tests below run over
every row: construction errors, loss goes down, convergence within the budget, param
groups, a step without gradients, ``p.grad`` untouched, state_dict determinism (direct and
through ``torch.save``/``torch.load(weights_only=True)``), closures, hyperparameter
pass-through to torch.optim, and how a module is split into groups.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from microadam.optim import registry
from microadam.optim.registry import (
    OptimizerSpec,
    create_optimizer,
    galore_param_groups,
    get_spec,
    list_optimizers,
    param_groups,
)

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny: one thread is faster and keeps the runs bit-reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """``steps`` optimizer steps (closure calls for closure methods) with ``hp`` must end
    within ``tol`` of the minimizer (max-norm). ``measured`` is the error we saw, for the
    record: the tolerance leaves a margin over it."""

    hp: dict[str, Any]
    steps: int
    tol: float
    measured: float
    note: str = ""


@dataclass(frozen=True)
class Row:
    name: str
    grouping: str  # the registry's grouping, checked against get_spec
    hp: dict[str, Any]  # hyperparameters of the generic tests
    # (argument, invalid value, substring of the ValueError message naming both)
    invalid: tuple[tuple[str, Any, str], ...]
    rosenbrock: Budget
    quadratic: Budget
    # None: gradient-based, step() reads p.grad; "backward": the closure calls backward()
    # (torch LBFGS); "loss": the closure only returns the loss, the optimizer differentiates
    # it itself and never touches p.grad (Newton, BFGS).
    closure: str | None = None
    # extra keys of a param group of 2-D matrices / of everything else, when the class
    # needs them (Muon's use_muon, GaLore's projection settings)
    matrix_group: dict[str, Any] = field(default_factory=dict)
    vector_group: dict[str, Any] = field(default_factory=dict)
    # dtype of the param-groups test: the low-bit peers compute in float32 and write the
    # parameter back through float32, which moves a float64 parameter even at lr=0
    groups_dtype: torch.dtype = DTYPE
    regression_steps: int = 50
    # the ValueError for two param groups (single-group closure methods)
    groups_error: str | None = None
    # things that are asserted to fail, with the reason (never silently skipped)
    closure_error: str | None = None
    weights_only_error: str | None = None
    lr_is_tensor: bool = False  # the class stores lr as a tensor in its param groups
    # tensors from this many elements get the low-bit state (below it the state is float32)
    quantized_numel: int | None = None
    # test function -> why it does not apply to this row (none does today)
    skips: dict[str, str] = field(default_factory=dict)
    # why the class's torch.compile is replaced by eager execution in most tests
    eager: str | None = None
    private_load: bool = False  # load_state_dict documents private copies of the buffers
    # torch-backed rows: constructor arguments with non-default values, covering every
    # argument of the torch class (except TORCH_ARGS_NOT_TESTED)
    torch_configs: tuple[dict[str, Any], ...] = ()
    note: str = ""


ADAM_ROSEN = Budget({"lr": 0.02}, 3000, 1e-3, 1.1e-5)
ADAM_QUAD = Budget({"lr": 0.05}, 1000, 1e-5, 2.4e-8)
NO_WD_ROSEN = Budget({"lr": 0.02, "weight_decay": 0.0}, 3000, 1e-3, 1.1e-5, "AdamW with wd 0")
NO_WD_QUAD = Budget({"lr": 0.05, "weight_decay": 0.0}, 1000, 1e-5, 2.4e-8, "AdamW with wd 0")
LOW_BIT_NOTE = (
    "the 2- and 10-element tensors are below the low-bit threshold, so the state is "
    "float32 and the update is computed in float32: tolerance 1e-4, not 1e-5"
)
GALORE_NOTE = (
    "a 1-D parameter: GaLore projects only 2-D matrices of a group with 'rank', so this is "
    "its plain AdamW path (the projection runs in the regression, groups, state_dict and "
    "grouping tests)"
)
MUON_NOTE = (
    "Muon's matrix update needs a 2-D parameter; the 1-D point goes to the AdamW fallback "
    "(use_muon=False, as muon_param_groups routes every non-matrix); a matrix would take "
    "steps of fixed spectral norm lr and never settle without a schedule"
)
ADAM_CFG_A = {
    "lr": 0.02,
    "betas": (0.8, 0.99),
    "eps": 1e-6,
    "weight_decay": 0.01,
    "amsgrad": True,
    "foreach": True,
    "maximize": True,
}

ROWS = [
    Row(
        "sgd",
        "decay",
        {"lr": 0.01, "momentum": 0.9},
        (
            ("lr", -1, "Invalid learning rate: -1"),
            ("momentum", -0.5, "Invalid momentum value: -0.5"),
        ),
        Budget({"lr": 1e-3, "momentum": 0.9}, 2000, 1e-3, 2.3e-4),
        Budget({"lr": 0.01, "momentum": 0.9}, 300, 1e-5, 1.9e-7),
        torch_configs=(
            {
                "lr": 0.03,
                "momentum": 0.8,
                "dampening": 0.1,
                "weight_decay": 0.02,
                "maximize": True,
                "foreach": True,
            },
            {"lr": 0.03, "momentum": 0.7, "nesterov": True, "weight_decay": 0.02, "fused": True},
        ),
        note="nesterov needs dampening 0, hence two configurations for the pass-through",
    ),
    Row(
        "rmsprop",
        "decay",
        {"lr": 0.01},
        (("lr", -1, "Invalid learning rate: -1"), ("alpha", -0.1, "Invalid alpha value: -0.1")),
        Budget({"lr": 3e-4, "momentum": 0.9}, 3000, 1e-3, 1.0e-4, "without momentum: 4.5e-2"),
        Budget({"lr": 1e-3, "momentum": 0.9}, 1000, 1e-3, 1.0e-9, "2e-4 after 2000: it rings"),
        torch_configs=(
            {
                "lr": 0.02,
                "alpha": 0.9,
                "eps": 1e-6,
                "weight_decay": 0.01,
                "momentum": 0.5,
                "centered": True,
                "foreach": True,
                "maximize": True,
            },
        ),
    ),
    Row(
        "adagrad",
        "decay",
        {"lr": 0.1},
        (
            ("lr", -1, "Invalid learning rate: -1"),
            ("lr_decay", -1, "Invalid lr_decay value: -1"),
        ),
        Budget({"lr": 1.0}, 6000, 0.1, 4.5e-2, "the accumulated squares shrink the steps"),
        Budget({"lr": 0.5}, 1000, 1e-4, 6.2e-6),
        torch_configs=(
            {
                "lr": 0.05,
                "lr_decay": 0.01,
                "weight_decay": 0.02,
                "initial_accumulator_value": 0.1,
                "eps": 1e-8,
                "foreach": True,
                "maximize": True,
            },
            {"lr": 0.05, "lr_decay": 0.01, "fused": True},
        ),
    ),
    Row(
        "adadelta",
        "decay",
        {"lr": 5.0},  # its first steps are ~sqrt(eps): lr 1 needs > 100 regression steps
        (("lr", -1, "Invalid learning rate: -1"), ("rho", 1.5, "Invalid rho value: 1.5")),
        Budget(
            {"lr": 0.1},
            6000,
            0.1,
            3.9e-2,
            "Adadelta stalls in the valley: lr 0.5 and 1 plateau at 0.4 and 0.6 however long",
        ),
        Budget({"lr": 0.5}, 2000, 0.05, 2.2e-2, "plateaus at a few 1e-2 (lr 1: 3e-2..6e-2)"),
        torch_configs=(
            {
                "lr": 0.5,
                "rho": 0.8,
                "eps": 1e-5,
                "weight_decay": 0.01,
                "foreach": True,
                "maximize": True,
            },
        ),
    ),
    Row(
        "adam",
        "decay",
        {"lr": 0.05},
        (
            ("lr", -1, "Invalid learning rate: -1"),
            ("betas", (1.0, 0.999), "Invalid beta parameter at index 0: 1.0"),
        ),
        ADAM_ROSEN,
        ADAM_QUAD,
        torch_configs=(
            {**ADAM_CFG_A, "decoupled_weight_decay": True},
            {"lr": 0.02, "weight_decay": 0.01, "fused": True},
        ),
    ),
    Row(
        "adamw",
        "decay",
        {"lr": 0.05},
        (("lr", -1, "Invalid learning rate: -1"), ("eps", -1, "Invalid epsilon value: -1")),
        NO_WD_ROSEN,
        NO_WD_QUAD,
        torch_configs=(ADAM_CFG_A, {"lr": 0.02, "weight_decay": 0.03, "fused": True}),
    ),
    Row(
        "amsgrad",
        "decay",
        {"lr": 0.05},
        (
            ("lr", -1, "Invalid learning rate: -1"),
            ("weight_decay", -1, "Invalid weight_decay value: -1"),
        ),
        Budget({"lr": 0.02}, 4000, 1e-2, 1.7e-3, "the running max of v slows the tail"),
        Budget({"lr": 0.05}, 1000, 1e-4, 1.3e-6),
        torch_configs=(
            {k: v for k, v in ADAM_CFG_A.items() if k != "amsgrad"}
            | {"decoupled_weight_decay": True},
            {"lr": 0.02, "weight_decay": 0.01, "fused": True},
        ),
        note="amsgrad=True is the registry's preset, so it is not passed in the pass-through",
    ),
    Row(
        "lbfgs",
        "flat",
        {"lr": 1.0, "max_iter": 3, "line_search_fn": "strong_wolfe"},
        (("lr", -1, "Invalid learning rate: -1"),),
        Budget({"line_search_fn": "strong_wolfe"}, 3, 1e-4, 2.7e-6, "3 steps of 20 iterations"),
        Budget({"line_search_fn": "strong_wolfe"}, 2, 1e-4, 3.2e-6, "stops on tolerance_change"),
        closure="backward",
        regression_steps=3,
        groups_error="LBFGS doesn't support per-parameter options (parameter groups)",
        torch_configs=(
            {
                "lr": 0.5,
                "max_iter": 7,
                "max_eval": 9,
                "tolerance_grad": 1e-9,
                "tolerance_change": 1e-11,
                "history_size": 5,
                "line_search_fn": "strong_wolfe",
            },
        ),
        note="torch's own message for two groups is asserted",
    ),
    Row(
        "adafactor",
        "decay",
        {"lr": 0.05},
        (
            ("lr", -1, "Learning rate should be >= 0 but is: -1"),
            ("beta2_decay", 0.5, "beta2_decay should be <= 0 but is: 0.5"),
        ),
        Budget(
            {"lr": 0.03, "beta2_decay": -0.5},
            6000,
            0.1,
            4.6e-2,
            "no momentum, fixed lr: it creeps along the valley (default beta2_decay: 5e-2 at "
            "lr 0.02 after 5000)",
        ),
        Budget({"lr": 0.01}, 3000, 1e-3, 1.2e-4),
        torch_configs=(
            {
                "lr": 0.02,
                "beta2_decay": -0.7,
                "eps": (1e-30, 2e-3),
                "d": 1.5,
                "weight_decay": 0.01,
                "foreach": True,
                "maximize": True,
            },
        ),
        note="torch's messages read 'Learning rate should be >= 0 but is: -1'",
    ),
    Row(
        "microadam",
        "decay",
        # small blocks so that the tiny test tensors have several Top-K blocks and buckets
        {"lr": 0.05, "density": 0.3, "topk_block_size": 8, "quant_block_size": 4},
        (
            ("lr", -1, "Invalid lr: -1 (expected lr >= 0)"),
            ("density", 0, "Invalid density: 0 (expected 0 < density <= 1)"),
        ),
        Budget(
            {"lr": 0.02, "density": 1.0, "window_size": 100},
            800,
            0.05,
            1.1e-2,
            "density 1.0: with density 0.5 (1 of 2 coordinates per step) it stays at 0.4 "
            "(0.02 without error feedback); window 100: with the default window of 10 the "
            "second moment forgets all but 10 gradients and the step never shrinks (0.6 after "
            "5000 steps at lr 0.02)",
        ),
        Budget(
            {"lr": 0.002, "density": 1.0},
            1000,
            1e-2,
            3.8e-3,
            "default window of 10, hence a small lr: once the window is full the steady step "
            "is ~5-6.5x lr (10 of the ~1000 squared gradients Adam would average); density "
            "0.5: stalls at 4e-2",
        ),
    ),
    Row(
        "adapprox",
        "decay",
        {"lr": 0.05},
        (
            ("lr", -1, "Invalid lr: -1 (expected lr >= 0)"),
            ("max_rank", 0, "Invalid max_rank: 0 (expected an integer >= min_rank = 1)"),
        ),
        Budget({"lr": 0.02}, 3000, 1e-3, 4.3e-5, "1-D: the dense second-moment rule"),
        Budget({"lr": 0.05}, 1000, 1e-6, 4.1e-9, "1-D: the dense second-moment rule"),
        private_load=True,
    ),
    Row(
        "muon",
        "muon",
        {"lr": 0.1, "adamw_lr": 0.05},
        (
            ("lr", -1, "Invalid lr: -1 (expected lr >= 0)"),
            ("ns_steps", 0, "Invalid ns_steps: 0 (expected an integer >= 1)"),
        ),
        Budget({"adamw_lr": 0.02, "adamw_betas": (0.9, 0.999)}, 3000, 1e-3, 1.1e-5, MUON_NOTE),
        Budget({"adamw_lr": 0.05, "adamw_betas": (0.9, 0.999)}, 1000, 1e-5, 2.4e-8, MUON_NOTE),
        matrix_group={"use_muon": True},
        vector_group={"use_muon": False},
        private_load=True,
    ),
    Row(
        "muonclip",
        "muon",
        {"lr": 0.1, "adamw_lr": 0.05},
        (
            ("lr", -1, "Invalid lr: -1 (expected lr >= 0)"),
            ("qk_clip_tau", -1, "Invalid qk_clip_tau: -1 (expected qk_clip_tau > 0)"),
        ),
        Budget({"adamw_lr": 0.02, "adamw_betas": (0.9, 0.999)}, 3000, 1e-3, 1.1e-5, MUON_NOTE),
        Budget({"adamw_lr": 0.05, "adamw_betas": (0.9, 0.999)}, 1000, 1e-5, 2.4e-8, MUON_NOTE),
        matrix_group={"use_muon": True},
        vector_group={"use_muon": False},
        private_load=True,
        note="Muon plus QK-clip of watched attention layers; these models have none, so it "
        "is Muon here (tests/optim/test_muonclip.py covers the clip)",
    ),
    Row(
        "newton",
        "flat",
        # a damped fixed step, so that 20 steps on the tiny net still move the parameters
        {"max_iter": 1, "line_search": None, "lr": 0.3},
        (
            ("lr", -1, "Invalid lr: -1 (expected lr > 0)"),
            ("hessian", "bogus", "Invalid hessian: 'bogus' (expected 'exact' or 'cg')"),
        ),
        Budget({}, 2, 1e-8, 1.9e-11, "2 steps of up to 20 iterations"),
        Budget({}, 1, 1e-10, 2.4e-15, "one Newton step solves a quadratic"),
        closure="loss",
        regression_steps=2,
        groups_error=(
            "Newton doesn't support per-parameter options (parameter groups): got 2 groups, "
            "expected 1"
        ),
    ),
    Row(
        "bfgs",
        "flat",
        {"max_iter": 2},
        (
            ("lr", 0, "Invalid lr: 0 (expected lr > 0)"),
            ("initial_scaling", 1, "Invalid initial_scaling: 1 (expected True or False)"),
        ),
        Budget({}, 2, 1e-6, 4.2e-8, "2 steps of up to 20 iterations"),
        Budget({}, 1, 1e-6, 2.5e-9, "one step of up to 20 iterations (n = 10)"),
        closure="loss",
        regression_steps=2,
        groups_error=(
            "BFGS doesn't support per-parameter options (parameter groups): got 2 groups, "
            "expected 1"
        ),
    ),
    Row(
        "adamw8bit",
        "decay",
        {"lr": 0.05},
        (
            ("lr", -1, "Invalid learning rate: -1"),
            ("betas", (1.0, 0.9), "Invalid beta parameter at index 0: 1.0"),
        ),
        NO_WD_ROSEN,
        Budget({"lr": 0.05, "weight_decay": 0.0}, 1000, 1e-4, 3.2e-6, LOW_BIT_NOTE),
        groups_dtype=torch.float32,
        quantized_numel=4096,
    ),
    Row(
        "galore_adamw",
        "galore",
        {"lr": 0.05, "no_deprecation_warning": True},
        (("lr", -1, "Invalid learning rate: -1 - should be >= 0.0"),),
        Budget({"lr": 0.02, "no_deprecation_warning": True}, 3000, 1e-3, 1.1e-5, GALORE_NOTE),
        Budget({"lr": 0.05, "no_deprecation_warning": True}, 1000, 1e-5, 2.4e-8, GALORE_NOTE),
        matrix_group={"rank": 1, "update_proj_gap": 3, "scale": 1.0, "proj_type": "std"},
        weights_only_error=(
            "GaLore keeps a galore_torch.GaLoreProjector object in each projected parameter's "
            "state, which torch.load(weights_only=True) refuses to unpickle"
        ),
        note="galore_torch validates only lr, betas and eps (weight_decay=-1 is accepted)",
    ),
    Row(
        "adamw4bit",
        "decay",
        {"lr": 0.05},
        (("lr", -1, "Invalid learning rate: -1"),),
        NO_WD_ROSEN,
        Budget({"lr": 0.05, "weight_decay": 0.0}, 1000, 1e-4, 3.2e-6, LOW_BIT_NOTE),
        groups_dtype=torch.float32,
        lr_is_tensor=True,
        quantized_numel=4096,
        eager="torchao torch.compiles its step per shape, dtype and weight decay: with a cold "
        "inductor cache its tests took 43 s on 2 cores (the first compile alone 12 s)",
        note="torchao validates lr, eps and betas only (weight_decay=-1 is accepted); it "
        "stores lr as a float32 tensor; every new shape or weight decay is a torch.compile",
    ),
]
TABLE = {row.name: row for row in ROWS}
NAMES = list_optimizers()
# Bugs found in the registry are kept here as strict expected failures while they are
# open: the fix makes the test XPASS, which fails the run, so the entry goes with the fix.
KNOWN_BUGS: dict[tuple[str, str], tuple[str, type[Exception]]] = {}


def names_for(test: str) -> list[Any]:
    """``NAMES``, with the known bugs of ``test`` marked as strict expected failures."""
    params = []
    for name in NAMES:
        if (test, name) in KNOWN_BUGS:
            reason, raises = KNOWN_BUGS[(test, name)]
            mark = pytest.mark.xfail(strict=True, reason=reason, raises=raises)
            params.append(pytest.param(name, marks=mark))
        else:
            params.append(name)
    return params


TORCH_NAMES = [n for n in NAMES if TABLE.get(n) and TABLE[n].torch_configs]
# torch.optim arguments the pass-through test does not set, and why.
TORCH_ARGS_NOT_TESTED = {
    "capturable": "CUDA graphs only: on CPU torch asserts 'params and state_steps must be on "
    "supported devices'",
    "differentiable": "differentiating through step() needs non-leaf parameters and "
    "autograd-enabled steps, outside what a registry passes on",
}


def row_of(name: str) -> Row:
    """The row of ``name``; the calling test is skipped if the row says it does not apply
    (``Row.skips``, keyed by the test function's name)."""
    row = TABLE.get(name)
    if row is None:
        pytest.fail(f"list_optimizers() has {name!r} but the spec table has no row for it")
    caller = inspect.currentframe().f_back
    test = caller.f_code.co_name if caller is not None else ""
    if test in row.skips:
        pytest.skip(f"{name}: {row.skips[test]}")
    return row


@pytest.fixture(autouse=True)
def _eager_where_compiling_is_too_slow(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    row = TABLE.get(params.get("name"))
    if row is None or row.eager is None:
        return
    # torchao compiles its per-parameter step for every new shape, dtype and weight decay:
    # run that function eagerly instead (the same operations, uncompiled).
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: fn)


# -- helpers ----------------------------------------------------------------------------


def layout(row: Row, params: list[torch.Tensor]) -> list[Any]:
    """The params argument for ``row``: a plain list, or matrix/other groups when the class
    needs per-group keys (Muon, GaLore)."""
    if not row.matrix_group and not row.vector_group:
        return list(params)
    matrices = [p for p in params if p.ndim == 2]
    rest = [p for p in params if p.ndim != 2]
    groups = []
    if matrices:
        groups.append({"params": matrices, **row.matrix_group})
    if rest:
        groups.append({"params": rest, **row.vector_group})
    return groups


def build(row: Row, params: list[torch.Tensor], **hp: Any) -> torch.optim.Optimizer:
    return create_optimizer(row.name, layout(row, params), **{**row.hp, **hp})


def closure_for(row: Row, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    """A closure in the style ``row``'s optimizer expects."""
    if row.closure == "loss":
        return loss_fn

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def take_step(row: Row, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    """One step on ``loss_fn``: with a closure for closure methods, else backward + step."""
    if row.closure is not None:
        return opt.step(closure_for(row, opt, loss_fn))
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step()
    return loss


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested optimizer state (tensors, containers, plain objects)."""
    if isinstance(a, torch.Tensor) and hasattr(a, "__tensor_flatten__"):
        # a tensor subclass (torchao's quantized state): compare what it is made of
        assert type(a) is type(b), where
        names, context = a.__tensor_flatten__()
        assert (names, context) == b.__tensor_flatten__(), where
        for attr in names:
            assert_same(getattr(a, attr), getattr(b, attr), f"{where}.{attr}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), f"{where}.{type(a).__name__}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- problems ---------------------------------------------------------------------------


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def rosenbrock_grad(x: torch.Tensor) -> torch.Tensor:
    a, b = x[0], x[1]
    return torch.stack([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])


def _ill_conditioned_quadratic(n: int = 10, condition: float = 100.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=DTYPE)
    a = q @ torch.diag(eigenvalues) @ q.T
    return 0.5 * (a + a.T), torch.randn(n, generator=g, dtype=DTYPE)


QUAD_A, QUAD_XSTAR = _ill_conditioned_quadratic()


def quadratic(x: torch.Tensor) -> torch.Tensor:
    d = x - QUAD_XSTAR
    return 0.5 * d @ (QUAD_A @ d)


def quadratic_grad(x: torch.Tensor) -> torch.Tensor:
    return QUAD_A @ (x - QUAD_XSTAR)


PROBLEMS = {
    # name: (loss, gradient, start, minimizer)
    "rosenbrock": (rosenbrock, rosenbrock_grad, [-1.5, 2.0], torch.ones(2, dtype=DTYPE)),
    "quadratic": (quadratic, quadratic_grad, [0.0] * 10, QUAD_XSTAR),
}


def test_quadratic_is_ill_conditioned():
    eigenvalues = torch.linalg.eigvalsh(QUAD_A)
    assert eigenvalues.min() > 0
    assert (eigenvalues.max() / eigenvalues.min()).item() == pytest.approx(100.0)


def regression_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g, dtype=DTYPE)
    w = torch.randn(10, 1, generator=g, dtype=DTYPE)
    y = x @ w + 0.3 + 0.01 * torch.randn(64, 1, generator=g, dtype=DTYPE)
    model = nn.Linear(10, 1).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(1, 10, generator=g, dtype=DTYPE))
        model.bias.zero_()
    return model, x, y


class TinyNet(nn.Module):
    """A hidden matrix, a head, biases: every kind of group (Muon, AdamW, GaLore, decay)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.hidden = nn.Linear(4, 6).to(DTYPE)
        self.out = nn.Linear(6, 1).to(DTYPE)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DTYPE))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


TINY_X = seeded(16, 4, seed=2)
TINY_Y = seeded(16, 1, seed=3)


def tiny_loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.mse_loss(model(TINY_X), TINY_Y)


# -- the table itself -------------------------------------------------------------------


def test_table_covers_every_registered_name():
    assert set(NAMES) <= set(TABLE), f"no row for {sorted(set(NAMES) - set(TABLE))}"
    assert set(TABLE) == set(list_optimizers(include_unavailable=True))
    assert len(ROWS) == len(TABLE), "duplicate rows"


@pytest.mark.parametrize("name", names_for("test_row_matches_registry_spec"))
def test_row_matches_registry_spec(name):
    row, spec = row_of(name), get_spec(name)
    assert spec.needs_closure == (row.closure is not None)
    assert spec.grouping == row.grouping
    assert bool(row.torch_configs) == spec.target.startswith("torch.optim:")
    # every budget leaves a margin over what was measured
    for budget in (row.rosenbrock, row.quadratic):
        assert budget.measured < budget.tol


# -- 1. construction errors -------------------------------------------------------------


def test_unknown_name_lists_every_valid_name():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError) as info:
        create_optimizer("nope", params)
    expected = f"Invalid optimizer name: 'nope' (expected one of {', '.join(sorted(TABLE))})"
    assert str(info.value) == expected
    assert str(info.value).startswith(
        "Invalid optimizer name: 'nope' (expected one of adadelta, adafactor, adagrad, adam, "
    )
    with pytest.raises(ValueError, match="Invalid optimizer name: 'nope'"):
        get_spec("nope")


def test_names_are_case_and_dash_insensitive(monkeypatch):
    params = [nn.Parameter(torch.zeros(2))]
    assert type(create_optimizer("AdamW", params)) is torch.optim.AdamW
    # The one name with an underscore belongs to an optional peer: pretend it is installed.
    monkeypatch.setattr(OptimizerSpec, "available", lambda self: True)
    assert get_spec("GaLore-AdamW").name == "galore_adamw"
    assert get_spec("LBFGS").name == "lbfgs"


def test_missing_optional_package_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "bitsandbytes" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(registry.importlib.util, "find_spec", find_spec)
    assert "adamw8bit" not in list_optimizers()
    assert "adamw8bit" in list_optimizers(include_unavailable=True)
    with pytest.raises(ValueError, match=r"needs the optional package 'bitsandbytes'"):
        create_optimizer("adamw8bit", [nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_is_a_type_error(name):
    row = row_of(name)
    params = [nn.Parameter(torch.zeros(3, 4, dtype=DTYPE)), nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="not_a_hyperparameter"):
        build(row, params, not_a_hyperparameter=1)


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameter_names_argument_and_value(name):
    row = row_of(name)
    assert row.invalid, "every row checks at least one invalid value"
    for argument, value, message in row.invalid:
        params = [nn.Parameter(torch.zeros(3, 4, dtype=DTYPE))]
        with pytest.raises(ValueError) as info:
            build(row, params, **{argument: value})
        assert message in str(info.value), (argument, value)


# -- 2. loss goes down ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_on_linear_regression(name):
    row = row_of(name)
    model, x, y = regression_problem()
    opt = build(row, list(model.parameters()))

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(row.regression_steps):
        take_step(row, opt, loss_fn)
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.5 * initial, (initial, final)


# -- 3. Rosenbrock and an ill-conditioned quadratic within the budget -------------------


@pytest.mark.parametrize("problem", ["rosenbrock", "quadratic"])
@pytest.mark.parametrize("name", NAMES)
def test_reaches_minimum_within_budget(name, problem):
    row = row_of(name)
    budget = row.rosenbrock if problem == "rosenbrock" else row.quadratic
    f, grad, start, minimizer = PROBLEMS[problem]
    x = torch.tensor(start, dtype=DTYPE, requires_grad=True)
    opt = create_optimizer(name, layout(row, [x]), **budget.hp)
    if row.closure is None:
        # The analytic gradient: the same numbers as autograd, a fraction of the time.
        for _ in range(budget.steps):
            x.grad = grad(x.detach())
            opt.step()
    else:
        closure = closure_for(row, opt, lambda: f(x))
        for _ in range(budget.steps):
            opt.step(closure)
    error = (x.detach() - minimizer).abs().max().item()
    assert error <= budget.tol, f"{name} on {problem}: error {error:.3g} > {budget.tol}"


# -- 4. param groups keep their own lr and weight decay ---------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_keep_their_own_lr_and_weight_decay(name):
    row = row_of(name)
    dtype = row.groups_dtype
    frozen = nn.Parameter(seeded(3, 4, seed=10).to(dtype))
    moving = nn.Parameter(seeded(3, 4, seed=11).to(dtype))
    groups = [
        {"params": [frozen], **row.matrix_group, "lr": 0.0, "weight_decay": 0.3},
        {"params": [moving], **row.matrix_group, "lr": 0.0123, "weight_decay": 0.05},
    ]
    if row.groups_error is not None:
        hp = {k: v for k, v in row.hp.items() if k != "weight_decay"}
        for group in groups:
            del group["weight_decay"]  # not a hyperparameter of these classes
        with pytest.raises(ValueError) as info:
            create_optimizer(name, groups, **hp)
        assert row.groups_error in str(info.value)
        return

    frozen0 = frozen.detach().clone()
    alone = nn.Parameter(moving.detach().clone())
    opt = create_optimizer(name, groups, **row.hp)
    reference = create_optimizer(
        name,
        [{"params": [alone], **row.matrix_group, "lr": 0.0123, "weight_decay": 0.05}],
        **row.hp,
    )
    for step in range(5):
        grad = seeded(3, 4, seed=100 + step).to(dtype)
        frozen.grad = seeded(3, 4, seed=200 + step).to(dtype)
        moving.grad = grad.clone()
        alone.grad = grad.clone()
        opt.step()
        reference.step()

    assert torch.equal(frozen.detach(), frozen0), "lr=0 must not move the parameter"
    assert not torch.equal(moving.detach(), seeded(3, 4, seed=11).to(dtype))
    # group 1 moves exactly as if it were alone: group 0's settings do not leak into it
    torch.testing.assert_close(moving.detach(), alone.detach())
    for group, (lr, wd) in zip(opt.param_groups, [(0.0, 0.3), (0.0123, 0.05)], strict=True):
        assert isinstance(group["lr"], torch.Tensor) == row.lr_is_tensor
        assert float(group["lr"]) == pytest.approx(lr, rel=1e-6)
        assert group["weight_decay"] == wd


# -- 5. a step without gradients changes nothing ----------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_changes_nothing(name):
    row = row_of(name)
    params = [nn.Parameter(seeded(3, 4, seed=20)), nn.Parameter(seeded(3, seed=21))]
    before = [p.detach().clone() for p in params]
    opt = build(row, params)
    # torch's Adagrad creates its state in __init__; every other class lazily at the
    # first gradient: the state must be what it was before the step
    state_before = copy.deepcopy(opt.state_dict()["state"])
    if row.closure == "loss":
        # Newton and BFGS differentiate the closure themselves; without a closure there
        # is nothing to differentiate, which is an error that must leave everything alone.
        with pytest.raises(RuntimeError, match="requires a closure"):
            opt.step()
    elif row.closure == "backward":
        # torch LBFGS: a closure that does not call backward() leaves every p.grad None.
        loss = opt.step(lambda: (params[0] ** 2).sum() + (params[1] ** 2).sum())
        assert loss is not None
    else:
        assert all(p.grad is None for p in params)
        opt.step()
    for p, p0 in zip(params, before, strict=True):
        assert torch.equal(p.detach(), p0)
    assert all(p.grad is None for p in params)
    if row.closure == "backward":
        # LBFGS records the evaluation, and nothing else.
        state = opt.state[params[0]]
        assert state["func_evals"] == 1 and state["n_iter"] == 0
    else:
        assert_same(opt.state_dict()["state"], state_before, "state")
        if name != "adagrad":
            assert opt.state_dict()["state"] == {}


# -- 6. p.grad is never written ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_leaves_p_grad_bit_identical(name):
    row = row_of(name)
    params = [nn.Parameter(seeded(3, 4, seed=30)), nn.Parameter(seeded(3, seed=31))]
    kwargs = {} if row.closure is not None else {"weight_decay": 0.1}
    opt = build(row, params, **kwargs)

    def loss_fn():
        return (params[0] ** 4).sum() + (params[0] @ params[1].new_ones(4) - params[1]).pow(2).sum()

    if row.closure == "loss":
        # The optimizer differentiates the loss itself: a p.grad left by the user is
        # neither read nor written.
        sentinels = [seeded(*p.shape, seed=32 + i) for i, p in enumerate(params)]
        for p, s in zip(params, sentinels, strict=True):
            p.grad = s.clone()
        opt.step(loss_fn)
        for p, s in zip(params, sentinels, strict=True):
            assert torch.equal(p.grad, s)
    elif row.closure == "backward":
        # LBFGS reads the gradient the closure leaves: after the step p.grad must still
        # be exactly what the last closure call computed.
        seen = []

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            seen.append([p.grad.clone() for p in params])
            return loss

        opt.step(closure)
        assert len(seen) > 1
        for p, g in zip(params, seen[-1], strict=True):
            assert torch.equal(p.grad, g)
    else:
        grads = [seeded(*p.shape, seed=34 + i) for i, p in enumerate(params)]
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            before = [p.detach().clone() for p in params]
            opt.step()
            for p, g in zip(params, grads, strict=True):
                assert torch.equal(p.grad, g)
            assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))


# -- 7. state_dict determinism ----------------------------------------------------------


def _train(row: Row, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        take_step(row, opt, lambda: tiny_loss(model))


def _same_run(model_a, opt_a, model_b, opt_b):
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa.detach(), pb.detach())
    assert_same(opt_a.state_dict(), opt_b.state_dict(), "state_dict")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_deterministic(name):
    row = row_of(name)
    # Built from the parameter list (the module path is test_model_grouping's): the hidden
    # and output matrices go to Muon / GaLore's projection, the biases to AdamW / plain.
    model = TinyNet()
    opt = build(row, list(model.parameters()))
    _train(row, model, opt, 10)
    saved = opt.state_dict()
    assert saved["state"], "priming must create state"
    buffer = io.BytesIO()
    torch.save(saved, buffer)

    model_copy = copy.deepcopy(model)
    opt_copy = build(row, list(model_copy.parameters()))
    opt_copy.load_state_dict(copy.deepcopy(saved))
    # load a second copy without deepcopy where the class promises private buffers
    model_private = copy.deepcopy(model) if row.private_load else None
    if row.private_load:
        opt_private = build(row, list(model_private.parameters()))
        opt_private.load_state_dict(saved)

    buffer.seek(0)
    if row.weights_only_error is not None:
        with pytest.raises(pickle.UnpicklingError, match="GaLoreProjector"):
            torch.load(buffer, weights_only=True)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # the full pickle does load
    else:
        loaded = torch.load(buffer, weights_only=True)
    model_loaded = copy.deepcopy(model)
    opt_loaded = build(row, list(model_loaded.parameters()))
    opt_loaded.load_state_dict(loaded)

    before = [p.detach().clone() for p in model.parameters()]
    _train(row, model, opt, 10)
    assert any(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    _train(row, model_copy, opt_copy, 10)
    _same_run(model, opt, model_copy, opt_copy)
    _train(row, model_loaded, opt_loaded, 10)
    _same_run(model, opt, model_loaded, opt_loaded)
    if row.private_load:
        _train(row, model_private, opt_private, 10)
        _same_run(model, opt, model_private, opt_private)


# -- 8. step(closure) returns the closure's loss ----------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_returns_the_closures_loss(name):
    row = row_of(name)
    model = TinyNet()
    opt = build(row, list(model.parameters()))
    losses = []
    inner = closure_for(row, opt, lambda: tiny_loss(model))

    def closure():
        loss = inner()
        losses.append(loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    if row.closure_error is not None:
        with pytest.raises(RuntimeError, match="does not require grad"):
            opt.step(closure)
        return
    result = opt.step(closure)
    assert losses, "the closure was called"
    assert isinstance(result, torch.Tensor)
    # the loss of the first evaluation, at the parameters before the step
    assert torch.equal(result.detach(), losses[0].detach())
    assert result.item() == pytest.approx(before_loss(before), rel=1e-12)
    # the closure's gradient was used: the parameters moved
    assert any(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )


def before_loss(values: list[torch.Tensor]) -> float:
    model = TinyNet()
    with torch.no_grad():
        for p, v in zip(model.parameters(), values, strict=True):
            p.copy_(v)
        return tiny_loss(model).item()


# -- 9. the registry passes every hyperparameter on to torch.optim ----------------------


def _torch_loss(params: list[torch.Tensor]) -> torch.Tensor:
    w, b = params
    return ((w - 0.3) ** 2).sum() + 0.1 * (w**4).sum() + ((b + 0.2) ** 2).sum()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.skipif(
                "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters,
                reason="torch.optim.Adam takes decoupled_weight_decay from torch 2.7 on",
            ),
        )
        if n in ("adam", "amsgrad")
        else n
        for n in TORCH_NAMES
    ],
)
def test_torch_hyperparameters_pass_through_unchanged(name):
    row, spec = row_of(name), get_spec(name)
    cls = spec.load()
    signature = inspect.signature(cls.__init__).parameters
    arguments = set(signature) - {"self", "params"} - set(TORCH_ARGS_NOT_TESTED) - set(spec.preset)
    covered = {
        key
        for config in row.torch_configs
        for key, value in config.items()
        if value != signature[key].default
    }
    assert arguments == covered, f"not given a non-default value: {sorted(arguments - covered)}"
    for config in row.torch_configs:
        assert not set(config) & set(spec.preset)
        params = [nn.Parameter(seeded(3, 4, seed=40)), nn.Parameter(seeded(3, seed=41))]
        twins = [nn.Parameter(p.detach().clone()) for p in params]
        opt = create_optimizer(name, params, **config)
        direct = cls(twins, **{**spec.preset, **config})
        assert type(opt) is cls
        assert opt.defaults == direct.defaults
        for key, value in config.items():
            assert opt.defaults[key] == value
        for _ in range(5):
            for o, ps in ((opt, params), (direct, twins)):
                closure = closure_for(row, o, lambda ps=ps: _torch_loss(ps))
                if row.closure is not None:
                    o.step(closure)
                else:
                    closure()
                    o.step()
        for p, q in zip(params, twins, strict=True):
            assert torch.equal(p.detach(), q.detach())
        assert not torch.equal(params[0].detach(), seeded(3, 4, seed=40))
        assert_same(opt.state_dict(), direct.state_dict(), "state")


def test_amsgrad_preset():
    params = [nn.Parameter(torch.zeros(2))]
    opt = create_optimizer("amsgrad", params)
    assert type(opt) is torch.optim.Adam and opt.defaults["amsgrad"] is True
    assert create_optimizer("adam", params).defaults["amsgrad"] is False


# -- 10. how a module is split into param groups ----------------------------------------


class GroupingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.to(DTYPE)

    def forward(self, tokens):
        h = self.embedding(tokens)
        h = self.norm(torch.tanh(self.fc1(h)))
        return self.head(torch.tanh(self.fc2(h)))


def _ids(params) -> list[int]:
    return [id(p) for p in params]


@pytest.mark.parametrize("name", names_for("test_model_grouping"))
def test_model_grouping(name):
    row, spec = row_of(name), get_spec(name)
    torch.manual_seed(0)
    model = GroupingNet()
    m = model
    matrices = [m.embedding.weight, m.fc1.weight, m.fc2.weight, m.head.weight]
    no_decay = [m.fc1.bias, m.norm.weight, m.norm.bias, m.fc2.bias, m.head.bias]
    hp = dict(row.hp)
    if row.grouping == "decay":
        opt = create_optimizer(name, model, **hp, weight_decay=0.07)
        decay_group, plain_group = opt.param_groups
        assert _ids(decay_group["params"]) == _ids(matrices)
        assert decay_group["weight_decay"] == 0.07
        assert _ids(plain_group["params"]) == _ids(no_decay)
        assert plain_group["weight_decay"] == 0.0
        # without weight_decay the matrices keep the class default
        default = inspect.signature(spec.load().__init__).parameters["weight_decay"].default
        opt_default = create_optimizer(name, model, **hp)
        assert opt_default.param_groups[0]["weight_decay"] == default
        assert opt_default.param_groups[1]["weight_decay"] == 0.0
    elif row.grouping == "muon":
        opt = create_optimizer(name, model, **hp, weight_decay=0.07)
        muon_group, adamw_group = opt.param_groups
        assert muon_group["use_muon"] is True and adamw_group["use_muon"] is False
        assert _ids(muon_group["params"]) == _ids([m.fc1.weight, m.fc2.weight])
        rest = [m.embedding.weight, m.fc1.bias, m.norm.weight, m.norm.bias, m.fc2.bias]
        assert _ids(adamw_group["params"]) == _ids([*rest, m.head.weight, m.head.bias])
        assert muon_group["weight_decay"] == 0.07
        assert adamw_group["lr"] == hp["adamw_lr"]
    elif row.grouping == "galore":
        opt = create_optimizer(
            name, model, **hp, rank=4, update_proj_gap=50, scale=0.5, proj_type="std"
        )
        projected, plain = opt.param_groups
        assert _ids(projected["params"]) == _ids(matrices)
        # capped at the smaller side of the group's smallest matrix (the 3 x 8 head)
        assert projected["rank"] == 3
        assert (projected["update_proj_gap"], projected["scale"]) == (50, 0.5)
        assert projected["proj_type"] == "std"
        assert _ids(plain["params"]) == _ids(no_decay) and "rank" not in plain
        assert "rank" not in opt.defaults
    else:
        assert row.grouping == "flat"
        opt = create_optimizer(name, model, **hp)
        (group,) = opt.param_groups
        assert _ids(group["params"]) == _ids(model.parameters())
    # the groups are usable: one step moves every parameter that has a gradient
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    target = seeded(2, 3, 3, seed=50)
    before = [p.detach().clone() for p in model.parameters()]
    take_step(row, opt, lambda: nn.functional.mse_loss(model(tokens), target))
    for p, b in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p.detach(), b)


def test_param_groups_and_galore_param_groups_directly():
    model = GroupingNet()
    decay, plain = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    assert len(decay["params"]) == 4 and len(plain["params"]) == 5
    (only,) = param_groups(nn.LayerNorm(3))  # empty groups are dropped
    assert only["weight_decay"] == 0.0
    projected, _ = galore_param_groups(model, rank=2)
    assert projected["rank"] == 2 and len(projected["params"]) == 4


@pytest.mark.parametrize("name", [n for n in NAMES if TABLE.get(n) and TABLE[n].quantized_numel])
def test_quantized_state_round_trips(name):
    """The low-bit peers keep float32 state below their size threshold, so the generic tests
    above only see that path: here a tensor of the threshold's size gets the quantized state,
    which must survive torch.load(weights_only=True) and continue bit-exactly."""
    row = row_of(name)
    side = int(row.quantized_numel**0.5)
    p = nn.Parameter(seeded(side, side, seed=60).float())
    opt = build(row, [p])
    for step in range(3):
        p.grad = seeded(side, side, seed=61 + step).float()
        opt.step()
    # bitsandbytes keeps uint8 codes; torchao a tensor subclass holding 4-bit codes
    quantized = [
        key
        for key, value in opt.state[p].items()
        if torch.is_tensor(value)
        and (value.dtype == torch.uint8 or type(value) is not torch.Tensor)
    ]
    assert quantized, {key: type(value) for key, value in opt.state[p].items()}
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = nn.Parameter(p.detach().clone())
    opt_twin = build(row, [twin])
    opt_twin.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3):
        p.grad = seeded(side, side, seed=70 + step).float()
        twin.grad = p.grad.clone()
        opt.step()
        opt_twin.step()
    assert torch.equal(p.detach(), twin.detach())
    assert_same(opt.state_dict(), opt_twin.state_dict(), "state")


def test_name_presets_cannot_be_contradicted():
    with pytest.raises(ValueError, match=r"Invalid amsgrad: False \(the name 'amsgrad' means"):
        create_optimizer("amsgrad", [torch.nn.Parameter(torch.zeros(2))], amsgrad=False)
    opt = create_optimizer("amsgrad", [torch.nn.Parameter(torch.zeros(2))], amsgrad=True)
    assert opt.defaults["amsgrad"] is True


def test_non_string_name_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"Invalid optimizer name: \['adam'\] \(expected a string\)"
    ):
        create_optimizer(["adam"], [torch.nn.Parameter(torch.zeros(2))])


def test_muon_grouping_skips_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    opt = create_optimizer("muon", model)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in held and id(model[0].bias) not in held
    assert id(model[1].weight) in held
