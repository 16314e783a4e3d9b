"""torch.optim's generic optimizer properties, ported over this package's optimizers.

PyTorch checks every optimizer it ships with the same tests (``TestOptimRenewed`` in
pytorch's ``test/test_optim.py``, driven by the ``OptimizerInfo`` table of
``torch/testing/_internal/common_optimizers.py``): the loss goes down with and without an
lr scheduler, param groups keep their own lr and weight decay, a step without gradients or
with zero gradients changes nothing, ``state_dict`` round trips are deterministic and load
with ``weights_only=True``, older and named state dicts load, a ``step`` saved as a Python
number loads, the state-dict, load-state-dict and step hooks run and keep their effects,
``deepcopy`` keeps every public attribute. Running those tests unchanged needs torch's test
harness (``expecttest``, device-type instantiation), so the properties are written here
again, with one table (:data:`INFOS`) of our optimizers and configurations in the role of
``optim_db``. Where our optimizers differ on purpose (Newton and BFGS take one param group,
as ``torch.optim.LBFGS``), the table says so and the test says what it checks instead.

Every test also compares against a reference where one exists: a run without the feature
(a float lr for a tensor lr, an uninterrupted run for a loaded state dict).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from microadam import Adapprox, MicroAdam
from microadam.optim import BFGS, Muon, MuonClip, Newton

# -- the table ------------------------------------------------------------------------------


def _tensor_of(item: Any) -> torch.Tensor:
    return item[1] if isinstance(item, tuple) else item  # (name, param) pairs


def _muon_groups(params: Any) -> list[dict[str, Any]]:
    """Muon takes 2-D parameters only: split every group into its matrices (Muon) and the
    rest (the AdamW part), each keeping the group's lr and weight decay."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        items = list(group["params"])
        settings = {k: v for k, v in group.items() if k != "params"}
        matrices = [x for x in items if _tensor_of(x).ndim == 2]
        rest = [x for x in items if _tensor_of(x).ndim != 2]
        if matrices:
            out.append({**settings, "params": matrices})
        if rest:
            out.append({**settings, "params": rest, "use_muon": False})
    return out


def _muon(params: Any, **kwargs: Any) -> Muon:
    return Muon(_muon_groups(params), **kwargs)


def _muonclip(params: Any, **kwargs: Any) -> MuonClip:
    # No attention layer here: the generic properties of the optimizer around the clip
    # (tests/optim/test_muonclip.py has the clip itself).
    return MuonClip(_muon_groups(params), **kwargs)


@dataclass(frozen=True)
class OptimInfo:
    """One optimizer of the package, the role of torch's ``OptimizerInfo``."""

    name: str
    build: Callable[..., Optimizer]
    configs: tuple[dict[str, Any], ...]
    step_requires_closure: bool = False
    single_group: bool = False  # only one param group (the line-search methods)
    flags_added_later: tuple[str, ...] = field(default=())  # torch's not_og_supported_flags


INFOS = [
    OptimInfo(
        "microadam",
        MicroAdam,
        (
            dict(density=0.5, window_size=3, fused=False),
            dict(density=0.2, window_size=4, quant_bits=8, weight_decay=0.1, fused="cpu"),
            dict(density=0.5, rounding="stochastic", maximize=True, fused=False),
            dict(density=0.5, error_feedback=False, value_dtype=torch.float32, fused="cpu"),
        ),
        flags_added_later=("fused",),
    ),
    OptimInfo(
        "adapprox",
        Adapprox,
        (dict(), dict(betas=(None, 0.999), weight_decay=0.1), dict(maximize=True)),
    ),
    OptimInfo(
        "muon",
        _muon,
        (dict(), dict(nesterov=False, weight_decay=0.1, adamw_lr=1e-2)),
    ),
    OptimInfo("muonclip", _muonclip, (dict(qk_clip_tau=10.0),)),
    OptimInfo(
        "newton",
        Newton,
        (dict(max_iter=3), dict(max_iter=3, hessian="cg"), dict(max_iter=3, line_search=None)),
        step_requires_closure=True,
        single_group=True,
    ),
    OptimInfo(
        "bfgs",
        BFGS,
        (dict(max_iter=3), dict(max_iter=3, line_search=None, lr=0.1)),
        step_requires_closure=True,
        single_group=True,
    ),
]


def _cases(*, multi_group: bool = False) -> list[Any]:
    return [
        pytest.param(info, config, id=f"{info.name}-{i}")
        for info in INFOS
        if not (multi_group and info.single_group)
        for i, config in enumerate(info.configs)
    ]


CASES = _cases()
MULTI_GROUP_CASES = _cases(multi_group=True)


def _lr(info: OptimInfo, config: dict[str, Any]) -> float:
    return config.get("lr", 1.0 if info.step_requires_closure else 1e-3)


def _linear_problem(dtype=torch.float32, contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = nn.Parameter(torch.randn(10, 5, generator=gen, dtype=dtype))
        bias = nn.Parameter(torch.randn(10, generator=gen, dtype=dtype))
    else:
        weight = nn.Parameter(torch.randn(10, 5, 2, generator=gen, dtype=dtype)[..., 0])
        bias = nn.Parameter(torch.randn(10, 2, generator=gen, dtype=dtype)[..., 0])
    x = torch.randn(5, generator=gen, dtype=dtype)
    return weight, bias, x


def _closure(opt: Optimizer, weight, bias, x):
    """The closure every torch user writes (as for ``torch.optim.LBFGS``)."""
    opt.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def _step(info: OptimInfo, opt: Optimizer, closure: Callable[[], Any]) -> Any:
    if info.step_requires_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def _assert_params_equal(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_state_equal(sd_a: dict, sd_b: dict) -> None:
    """Two state dicts hold the same values bit for bit (names of params aside)."""

    def strip(sd):
        sd = copy.deepcopy(sd)
        for g in sd["param_groups"]:
            g.pop("param_names", None)
        return sd

    a, b = strip(sd_a), strip(sd_b)
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        sa, sb = a["state"][pid], b["state"][pid]
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert sa[key].dtype == sb[key].dtype, key
                torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, equal_nan=True)
            else:
                assert sa[key] == sb[key], key


# -- the loss goes the right way ------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("scheduler", [None, "step", "plateau"])
@pytest.mark.parametrize(("info", "config"), CASES)
def test_goes_right_direction(info, config, contiguous, scheduler):
    weight, bias, x = _linear_problem(contiguous=contiguous)
    opt = info.build([weight, bias], **config)
    schedulers = {
        None: [],
        "step": [StepLR(opt, step_size=5, gamma=0.9)],
        "plateau": [ReduceLROnPlateau(opt, factor=0.5, patience=1)],
    }[scheduler]
    closure = functools.partial(_closure, opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        loss = _step(info, opt, closure)
        for s in schedulers:
            s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
    final = closure().item()
    if config.get("maximize", False):
        assert final > initial
    else:
        assert final < initial


@pytest.mark.parametrize(("info", "config"), MULTI_GROUP_CASES)
def test_param_groups_keep_their_lr_and_weight_decay(info, config):
    """torch's test_param_groups_lr and test_param_groups_weight_decay: a group with a
    near-zero lr does not move, and groups with and without weight decay both train."""
    weight, bias, x = _linear_problem()
    irrelevant = nn.Parameter(torch.randn(2, 3))
    frozen = irrelevant.detach().clone()
    lr = _lr(info, config)
    kwargs = {k: v for k, v in config.items() if k not in ("lr", "weight_decay")}
    opt = info.build(
        [
            {"params": [weight], "lr": lr, "weight_decay": 0.1},
            {"params": [bias], "lr": lr, "weight_decay": 0.0},
            {"params": [irrelevant]},
        ],
        lr=1e-28,
        **kwargs,
    )
    closure = functools.partial(_closure, opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        closure()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    final = closure().item()
    assert (final > initial) if config.get("maximize", False) else (final < initial)
    # lr 1e-28 moves a parameter of size ~1 by less than one float32 ulp
    torch.testing.assert_close(irrelevant, frozen, rtol=0, atol=0)


@pytest.mark.parametrize(("info", "config"), MULTI_GROUP_CASES)
def test_param_group_with_lr_scheduler_goes_right_direction(info, config):
    weight, bias, x = _linear_problem()
    opt = info.build([{"params": [weight]}, {"params": [bias], "lr": 0.01}], **config)
    scheduler = StepLR(opt, step_size=5, gamma=0.5)
    closure = functools.partial(_closure, opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        _step(info, opt, closure)
        scheduler.step()
    final = closure().item()
    assert (final > initial) if config.get("maximize", False) else (final < initial)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_tensor_lr_matches_float_lr(info, config):
    weight, bias, x = _linear_problem()
    weight_c = nn.Parameter(weight.detach().clone())
    bias_c = nn.Parameter(bias.detach().clone())
    lr = _lr(info, config)
    kwargs = {k: v for k, v in config.items() if k != "lr"}
    opt = info.build([weight, bias], lr=lr, **kwargs)
    opt_c = info.build([weight_c, bias_c], lr=torch.tensor(lr), **kwargs)
    for _ in range(5):
        # Stochastic rounding draws each state's seed from torch's generator at its first
        # step: the same seed for both.
        torch.manual_seed(0)
        _step(info, opt, functools.partial(_closure, opt, weight, bias, x))
        torch.manual_seed(0)
        _step(info, opt_c, functools.partial(_closure, opt_c, weight_c, bias_c, x))
        _assert_params_equal([weight, bias], [weight_c, bias_c])


# -- no gradient, zero gradient ---------------------------------------------------------------


def _constant_closure():
    return torch.tensor([1.0])


@pytest.mark.parametrize(("info", "config"), CASES)
def test_step_is_noop_when_params_have_no_grad(info, config):
    params = [torch.randn(2, 3) for _ in range(2)]  # requires_grad=False: never a .grad
    before = [p.clone() for p in params]
    opt = info.build(params, **config)
    opt.step(_constant_closure)
    _assert_params_equal(params, before)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_step_is_noop_for_zero_grads(info, config):
    if config.get("weight_decay", 0):
        pytest.skip("weight decay moves parameters whatever their gradient")
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    opt = info.build([param], **config)
    param.grad = torch.zeros_like(param)
    opt.step(_constant_closure)
    torch.testing.assert_close(param, before, rtol=0, atol=0)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_non_empty_state_after_a_step(info, config):
    model = nn.Linear(5, 5)
    opt = info.build(model.parameters(), **config)
    loss = model(torch.rand(2, 5)).sum()
    loss.backward()
    opt.step(lambda: loss.detach())
    assert opt.state and all(len(state) > 0 for state in opt.state.values())


@pytest.mark.parametrize(("info", "config"), CASES)
def test_optimizer_can_be_printed(info, config):
    params = [nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = info.build(params, **config)
    text = repr(opt)
    assert type(opt).__name__ in text and "Parameter Group 0" in text


# -- state dicts -------------------------------------------------------------------------------


def _named(params, named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


@pytest.mark.parametrize("named_c", [False, True], ids=["plain_c", "named_c"])
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize(("info", "config"), CASES)
def test_state_dict_deterministic(info, config, named, named_c):
    """Prime 10 steps, load the state into a fresh optimizer on equal parameters, run both
    10 more steps: parameters and state dicts stay bit-identical."""
    weight, bias, x = _linear_problem()
    opt = info.build(_named([weight, bias], named), **config)
    closure = functools.partial(_closure, opt, weight, bias, x)
    for _ in range(10):
        _step(info, opt, closure)
    weight_c = nn.Parameter(weight.detach().clone())
    bias_c = nn.Parameter(bias.detach().clone())
    opt_c = info.build(_named([weight_c, bias_c], named_c), **config)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    closure_c = functools.partial(_closure, opt_c, weight_c, bias_c, x)
    for _ in range(10):
        _step(info, opt, closure)
        _step(info, opt_c, closure_c)
        _assert_params_equal([weight, bias], [weight_c, bias_c])
    _assert_state_equal(opt.state_dict(), opt_c.state_dict())


def _conv_bn_model(dtype=torch.float32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2))
    return model.to(dtype), torch.rand(1, 4, 16, 16, dtype=dtype)


def _model_closure(opt, model, x):
    opt.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize(("info", "config"), CASES)
def test_can_load_older_state_dict(info, config):
    """A state dict saved before the settings of ``flags_added_later`` existed loads and
    steps (torch's test_can_load_older_state_dict)."""
    model, x = _conv_bn_model()
    opt = info.build(model.parameters(), **config)
    closure = functools.partial(_model_closure, opt, model, x)
    for _ in range(3):
        _step(info, opt, closure)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in info.flags_added_later:
            group.pop(flag, None)
    opt.load_state_dict(old)
    before = [p.detach().clone() for p in model.parameters()]
    _step(info, opt, closure)
    if not info.step_requires_closure:  # a line-search method may have converged already
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("named_c", [False, True], ids=["plain_c", "named_c"])
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize(("info", "config"), CASES)
def test_can_load_from_to_named_state_dict(info, config, named, named_c):
    model, x = _conv_bn_model()
    params = model.named_parameters() if named else model.parameters()
    opt = info.build(params, **config)
    for _ in range(3):
        _step(info, opt, functools.partial(_model_closure, opt, model, x))
    saved = copy.deepcopy(opt.state_dict())
    opt2 = info.build(model.named_parameters() if named_c else model.parameters(), **config)
    opt2.load_state_dict(saved)
    _step(info, opt2, functools.partial(_model_closure, opt2, model, x))
    if named or named_c:
        names = [n for g in opt2.state_dict()["param_groups"] for n in g["param_names"]]
        assert sorted(names) == ["0.bias", "0.weight", "1.bias", "1.weight"]


@pytest.mark.parametrize(("info", "config"), CASES)
def test_save_load_equality_with_weights_only(info, config):
    weight, bias, x = _linear_problem()
    opt = info.build([weight, bias], **config)
    closure = functools.partial(_closure, opt, weight, bias, x)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    with tempfile.TemporaryFile() as f:
        torch.save(sd, f)
        f.seek(0)
        _assert_state_equal(torch.load(f, weights_only=True), sd)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_nontensor_step(info, config):
    """A ``step`` saved as a Python number loads (torch.optim converts it) and the run
    continues exactly as with the tensor."""
    weight, bias, x = _linear_problem()
    opt = info.build([weight, bias], **config)
    closure = functools.partial(_closure, opt, weight, bias, x)
    for _ in range(3):
        _step(info, opt, closure)
    sd = copy.deepcopy(opt.state_dict())
    numbers = copy.deepcopy(sd)
    converted = 0
    for state in numbers["state"].values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].item()
            converted += 1
    weight_c = nn.Parameter(weight.detach().clone())
    bias_c = nn.Parameter(bias.detach().clone())
    opt_c = info.build([weight_c, bias_c], **config)
    opt_c.load_state_dict(numbers)
    opt.load_state_dict(sd)
    for _ in range(3):
        _step(info, opt, closure)
        _step(info, opt_c, functools.partial(_closure, opt_c, weight_c, bias_c, x))
    _assert_params_equal([weight, bias], [weight_c, bias_c])
    if converted:
        _assert_state_equal(opt.state_dict(), opt_c.state_dict())


@pytest.mark.parametrize("source", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("target", [torch.float32, torch.float64])
@pytest.mark.parametrize(("info", "config"), CASES)
def test_state_dict_loads_across_parameter_dtypes(info, config, source, target):
    """A state dict saved for parameters of one dtype loads into parameters of another
    and steps (torch casts floating state to the parameter's dtype)."""
    if info.step_requires_closure and source == torch.bfloat16:
        pytest.skip("the line-search methods compute in float32 or float64 only")
    if config.get("fused") == "cpu" and torch.float64 in (source, target):
        pytest.skip("the fused CPU kernel takes float32, bfloat16 and float16 parameters")
    weight, bias, x = _linear_problem(dtype=source)
    opt = info.build([weight, bias], **config)
    for _ in range(3):
        _step(info, opt, functools.partial(_closure, opt, weight, bias, x))
    weight_t = nn.Parameter(weight.detach().to(target))
    bias_t = nn.Parameter(bias.detach().to(target))
    opt_t = info.build([weight_t, bias_t], **config)
    opt_t.load_state_dict(copy.deepcopy(opt.state_dict()))
    x_t = x.to(target)
    closure = functools.partial(_closure, opt_t, weight_t, bias_t, x_t)
    initial = closure().item()
    for _ in range(5):
        _step(info, opt_t, closure)
    final = closure().item()
    if info.step_requires_closure:  # it may have reached the minimum (up to rounding) already
        assert final <= initial + 1e-6 * max(1.0, abs(initial))
    else:
        assert (final > initial) if config.get("maximize", False) else (final < initial)


# -- hooks -------------------------------------------------------------------------------------


def _state_dict_pre_hook(opt: Optimizer) -> None:
    opt.state["test"] = 1


def _state_dict_post_hook(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
    return state_dict


def _load_pre_hook_edit(opt: Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook_replace(opt: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    replaced = copy.deepcopy(state_dict)
    replaced["param_groups"][0]["lr"] = 0.003
    return replaced


def _load_post_hook(opt: Optimizer) -> None:
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


def _primed(info, config):
    weight, bias, x = _linear_problem()
    opt = info.build([weight, bias], **config)
    for _ in range(2):
        _step(info, opt, functools.partial(_closure, opt, weight, bias, x))
    return opt, (weight, bias, x)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_state_dict_hooks(info, config):
    opt, _ = _primed(info, config)
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_state_dict_pre_hooks_and_prepend(info, config):
    opt, _ = _primed(info, config)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_pre_hook_edit)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    # Prepended, the replacing hook runs first and the editing one then edits its result.
    opt.register_load_state_dict_pre_hook(_load_pre_hook_replace, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_state_dict_pre_hook_result_is_what_loads(info, config):
    """The dict a pre-hook returns is the one loaded, state included: here it halves every
    floating state tensor, and the optimizer's state is the halved one."""
    opt, _ = _primed(info, config)
    sd = copy.deepcopy(opt.state_dict())

    def halve(o, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                    state[key] = value / 2
        return state_dict

    opt.register_load_state_dict_pre_hook(halve)
    opt.load_state_dict(sd)
    expected = halve(opt, sd)
    _assert_state_equal(opt.state_dict(), expected)


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_state_dict_post_hook(info, config):
    opt, _ = _primed(info, config)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is False
    assert opt.state["ran_load_state_dict_post_hook"] is True
    # The post hook's entries are not parameters' state: saving and loading again keeps
    # them (torch.optim loads such entries as they are), and stepping ignores them.
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_state_dict_pre_and_post_hooks(info, config):
    opt, (weight, bias, x) = _primed(info, config)
    opt.register_load_state_dict_pre_hook(_load_pre_hook_replace)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    assert opt.state["ran_load_state_dict_post_hook"] is True
    _step(info, opt, functools.partial(_closure, opt, weight, bias, x))


@pytest.mark.parametrize(("info", "config"), CASES)
def test_load_state_dict_post_hook_edits_are_kept(info, config):
    opt, _ = _primed(info, config)
    sd = copy.deepcopy(opt.state_dict())
    marker = torch.tensor(7.0)

    def post(o):
        for state in o.state.values():
            if isinstance(state, dict):
                state["marker"] = marker

    opt.register_load_state_dict_post_hook(post)
    opt.load_state_dict(sd)
    states = [s for s in opt.state.values() if isinstance(s, dict) and s]
    assert states and all(s["marker"] is marker for s in states)


def _dummy_closure():
    return 1


@pytest.mark.parametrize(("info", "config"), CASES)
def test_step_pre_and_post_hooks(info, config):
    params = [torch.tensor([1.0, 1.0])]
    closure = _dummy_closure if info.step_requires_closure else None
    calls = []
    opt = info.build(params, **config)
    other = SGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(1)),
        opt.register_step_post_hook(lambda o, a, k: calls.append(2)),
        other.register_step_pre_hook(lambda o, a, k: calls.append(1)),
        other.register_step_post_hook(lambda o, a, k: calls.append(2)),
    ]
    try:
        opt.step(closure)
        other.step()
        opt.step(closure)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1, 2, 5] * 3
    opt.step(closure)
    assert calls == [0, 1, 2, 5] * 3


@pytest.mark.parametrize(("info", "config"), CASES)
def test_deepcopy_copies_all_public_attrs(info, config):
    opt, _ = _primed(info, config)

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    clone = copy.deepcopy(opt)
    assert public(clone) == public(opt)
    _assert_state_equal(clone.state_dict(), opt.state_dict())


@pytest.mark.parametrize(
    ("info", "config"), [c for c in CASES if c.values[0].step_requires_closure]
)
def test_second_order_optims_return_consistent_types(info, config):
    params = [torch.randn(10, 5), torch.randn(10)]

    def closure():
        return torch.tensor([10.0])

    # torch's test uses -inf for "never converged"; our tolerances must be >= 0, and 0 is
    # the same here (the loop runs until the gradient is exactly zero).
    converged = info.build(params, **{**config, "tolerance_grad": float("inf")})
    running = info.build(params, **{**config, "tolerance_grad": 0.0})
    assert type(converged.step(closure)) is type(running.step(closure))
