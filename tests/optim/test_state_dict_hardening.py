"""Loading a wrong state dict fails clearly and leaves the optimizer exactly as it was.

For MicroAdam and Adapprox: another optimizer's state dict (torch.optim.AdamW's, SGD's,
each other's), one saved for a parameter of another size, one with an unknown format
version, and a few malformed ones. Each raises ``ValueError`` with a message that says
what is wrong (and, where a parameter is at fault, which one); every state tensor (bits
and dtype), every param group and the parameters are compared before and after.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from microadam import Adapprox, MicroAdam

SPECS = {
    "MicroAdam": (MicroAdam, "microadam_format", dict(density=0.1, topk_block_size=64)),
    "Adapprox": (Adapprox, "adapprox_format", dict()),
}


def _trained(cls, shapes, steps=3, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = cls(params, lr=1e-2, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _snapshot(opt, params):
    return (
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        [[id(p) for p in g["params"]] for g in opt.param_groups],
        [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params],
        len(opt.state),
    )


def _assert_same(opt, params, snapshot):
    groups, ids, per_param, n_state = snapshot
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == ids
    assert len(opt.state) == n_state
    for i, (p, (x, st)) in enumerate(zip(params, per_param, strict=True)):
        assert torch.equal(_bits(p), _bits(x)), f"param {i} changed"
        assert opt.state[p].keys() == st.keys(), f"param {i}: state keys changed"
        for key, value in st.items():
            got = opt.state[p][key]
            assert got.dtype == value.dtype and got.shape == value.shape, f"{i}: {key}"
            assert torch.equal(_bits(got), _bits(value)), f"param {i}: {key} changed"


def _refused(opt, params, sd, pattern):
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    _assert_same(opt, params, snapshot)


@pytest.mark.parametrize("name", list(SPECS))
def test_another_optimizers_state_dict_is_named_as_such(name):
    cls, key, kw = SPECS[name]
    opt, params = _trained(cls, [(20, 10), (30,)], **kw)
    # (a) torch.optim.AdamW after a step: the message names the first parameter and the
    # foreign keys of its state, and AdamW's own settings.
    other_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adamw = torch.optim.AdamW(other_params)
    for p in other_params:
        p.grad = torch.ones_like(p)
    adamw.step()
    _refused(
        opt,
        params,
        adamw.state_dict(),
        rf"it has no '{key}', so it looks like another optimizer's state dict .*not an? "
        rf"{name} one: the saved state of parameter 0 of param group 0 \(shape \(20, 10\)\) "
        r"has keys \['exp_avg', 'exp_avg_sq', 'step'\]; its param groups have settings "
        rf"{name} does not know: \[.*'amsgrad'",
    )
    # A fresh AdamW (no state yet) is still recognised by its settings.
    _refused(
        opt,
        params,
        torch.optim.AdamW(other_params).state_dict(),
        r"looks like another optimizer's state dict.*does not know: \[.*'amsgrad'",
    )
    sgd = torch.optim.SGD(other_params, lr=0.1, momentum=0.9)
    sgd.step()
    _refused(opt, params, sgd.state_dict(), r"has keys \['momentum_buffer'\]")


def test_micro_adam_and_adapprox_state_dicts_are_told_apart():
    micro, micro_params = _trained(MicroAdam, [(20, 10)], density=0.1)
    approx, approx_params = _trained(Adapprox, [(20, 10)])
    _refused(
        micro,
        micro_params,
        approx.state_dict(),
        r"it looks like an Adapprox state dict \(it has 'adapprox_format', no "
        r"'microadam_format'\), not a MicroAdam one; load it into Adapprox",
    )
    _refused(
        approx,
        approx_params,
        micro.state_dict(),
        r"it looks like a MicroAdam state dict \(it has 'microadam_format', no "
        r"'adapprox_format'\), not an Adapprox one; load it into MicroAdam",
    )


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        (
            "MicroAdam",
            r"MicroAdam state of parameter 1 of param group 0 \(shape \(30,\)\): window_indices "
            r"has shape \(10, 4\), expected \(10, 3\) .*param shape \(30,\)",
        ),
        (
            "Adapprox",
            r"Adapprox state of parameter 0 of param group 0 \(shape \(20, 10\)\): factor_q has "
            r"shape \(21, \d+\), which does not fit the parameter",
        ),
    ],
)
def test_state_of_a_parameter_of_another_shape_is_refused(name, pattern):
    cls, _, kw = SPECS[name]
    opt, params = _trained(cls, [(20, 10), (30,)], **kw)
    # Parameter 0 (Adapprox) or parameter 1 (MicroAdam, which keeps flat state and so
    # notices a different number of elements) has another size in the saved optimizer.
    other_shapes = [(21, 10), (30,)] if name == "Adapprox" else [(20, 10), (40,)]
    other, _ = _trained(cls, other_shapes, seed=1, **kw)
    _refused(opt, params, other.state_dict(), pattern)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("version", ["next", 0, "1", None])
def test_unknown_format_version_is_refused(name, version):
    cls, key, kw = SPECS[name]
    current = {"MicroAdam": 1, "Adapprox": 2}[name]
    version = current + 1 if version == "next" else version
    opt, params = _trained(cls, [(20, 10), (30,)], **kw)
    sd = opt.state_dict()
    sd[key] = version
    # The per-group copies (for distributed checkpoints) as well.
    sd["param_groups"] = [{**g, key: version} for g in sd["param_groups"]]
    if version is None:
        sd["param_groups"] = [{k: v for k, v in g.items() if k != key} for g in sd["param_groups"]]
        del sd[key]
        pattern = rf"it has no '{key}'"
    else:
        pattern = (
            rf"{key} is {re.escape(repr(version))}, but this version of microadam reads "
            rf"{name} state dicts of format {current} only"
        )
    _refused(opt, params, sd, pattern)


@pytest.mark.parametrize("name", list(SPECS))
def test_malformed_state_dicts_are_refused(name):
    cls, _, kw = SPECS[name]
    opt, params = _trained(cls, [(20, 10), (30,)], **kw)
    _refused(opt, params, {"state": {}}, r"expected an optimizer state dict with 'state' and")
    _refused(opt, params, [1, 2], r"expected an optimizer state dict .* got list")
    good = opt.state_dict()
    missing_group = {**good, "param_groups": good["param_groups"] * 2}
    _refused(opt, params, missing_group, r"it has 2 param groups, the optimizer has 1")
    extra_state = {**good, "state": {**good["state"], 99: good["state"][0]}}
    _refused(opt, params, extra_state, r"state for unknown parameter id 99")


@pytest.mark.parametrize("name", list(SPECS))
def test_a_good_state_dict_still_loads_after_refusals(name):
    """The refusals above leave a usable optimizer: the right dict loads and resumes."""
    cls, _, kw = SPECS[name]
    opt, params = _trained(cls, [(20, 10), (30,)], **kw)
    sd = opt.state_dict()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = cls(fresh_params, lr=0.5)
    with pytest.raises(ValueError):
        fresh.load_state_dict(torch.optim.AdamW(fresh_params).state_dict())
    fresh.load_state_dict(sd)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        for p, q in zip(params, fresh_params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    for p, q in zip(params, fresh_params, strict=True):
        assert torch.equal(p, q)
