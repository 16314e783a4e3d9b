"""The checkpoint format details that torch.distributed.checkpoint relies on, in one process."""

from __future__ import annotations

import pytest
import torch
from torch.optim import Optimizer

from microadam import MicroAdam
from microadam.optim.adapprox import Adapprox

OPTIMIZERS = {
    "MicroAdam": lambda ps: MicroAdam(ps, density=0.1, topk_block_size=32, quant_block_size=16),
    "Adapprox": lambda ps: Adapprox(ps, max_rank=4),
}


def _primed(name: str = "MicroAdam"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = OPTIMIZERS[name](model.parameters())
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_same_state(opt, other) -> None:
    for p, q in zip(opt.state, other.state, strict=True):
        assert set(other.state[q]) == set(opt.state[p])
        for key, value in opt.state[p].items():
            assert other.state[q][key].dtype == value.dtype
            assert torch.equal(other.state[q][key], value)


def test_version_travels_in_param_groups():
    """DSD (torch.distributed.checkpoint.state_dict) keeps only ``state`` and
    ``param_groups``; the layout version rides in every group too, so such a dict loads,
    and a dict without any version (another optimizer's) is still refused."""
    _, opt = _primed()
    sd = opt.state_dict()
    assert sd["microadam_format"] == 1
    assert all(g["microadam_format"] == 1 for g in sd["param_groups"])
    _, fresh = _primed()
    fresh.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    assert all("microadam_format" not in g for g in fresh.param_groups)
    _assert_same_state(opt, fresh)
    adam = torch.optim.Adam(torch.nn.Linear(8, 16).parameters()).state_dict()
    with pytest.raises(ValueError, match=r"no 'microadam_format', so it looks like another"):
        fresh.load_state_dict(adam)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_get_and_set_optimizer_state_dict_round_trip_unsharded(name):
    """DSD on a plain (unsharded) model in one process: names instead of ids, same state."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _primed(name)
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}
    assert set(osd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model2, opt2 = _primed(name)
    for p in opt2.state.values():
        for value in p.values():
            value.zero_()
    set_optimizer_state_dict(model2, opt2, osd)
    _assert_same_state(opt, opt2)


def test_adapprox_plain_state_is_torch_layout():
    """Without DTensor parameters Adapprox's state is ``torch.optim``'s (the same tensors
    under the same keys, factors of the chosen rank, no ``factor_rank``); the dict adds
    ``adapprox_format`` 2 at the top level and in every param group (for DSD)."""
    _, opt = _primed("Adapprox")
    sd = opt.state_dict()
    torch_sd = Optimizer.state_dict(opt)
    assert sd["adapprox_format"] == 2
    assert set(sd) == {"state", "param_groups", "adapprox_format"}
    assert sd["param_groups"] == [{**g, "adapprox_format": 2} for g in torch_sd["param_groups"]]
    assert set(sd["state"]) == set(torch_sd["state"]) == {0, 1, 2, 3}
    for pid, saved in sd["state"].items():
        assert set(saved) == set(torch_sd["state"][pid])
        assert all(saved[k] is v for k, v in torch_sd["state"][pid].items())
    assert set(sd["state"][0]) == {"step", "factor_q", "factor_u", "rng_state", "exp_avg"}
    assert sd["state"][0]["factor_q"].shape[1] == sd["state"][0]["factor_u"].shape[1] <= 4


@pytest.mark.parametrize("where", ["top level", "param groups"])
def test_adapprox_version_1_without_sharded_state_loads(where):
    """Format 1 differs from 2 only for DTensor parameters, so a version-1 dict of plain
    parameters (top level, or only in the groups as DSD leaves it) loads as it is."""
    _, opt = _primed("Adapprox")
    sd = opt.state_dict()
    del sd["adapprox_format"]
    if where == "top level":
        sd["adapprox_format"] = 1
    else:
        sd["param_groups"] = [{**g, "adapprox_format": 1} for g in sd["param_groups"]]
    _, fresh = _primed("Adapprox")
    for p in fresh.state.values():
        for value in p.values():
            value.zero_()
    fresh.load_state_dict(sd)
    assert all("adapprox_format" not in g for g in fresh.param_groups)
    _assert_same_state(opt, fresh)
    assert fresh.state_dict()["adapprox_format"] == 2


@pytest.mark.parametrize("where", ["top level", "param groups"])
def test_adapprox_version_1_with_per_shard_keys_is_refused(where):
    """What microadam wrote before format 2 for a DTensor parameter (keys with a per-rank
    suffix, factors padded to the largest rank with ``factor_rank``) is refused with a
    ``ValueError`` that says so, and the optimizer is left as it was."""
    _, opt = _primed("Adapprox")
    sd = opt.state_dict()
    del sd["adapprox_format"]
    state0 = dict(sd["state"][0])
    q, u = state0["factor_q"], state0["factor_u"]
    state0["factor_rank"] = torch.tensor(q.shape[1], dtype=torch.int64)
    state0["factor_q"] = torch.nn.functional.pad(q, (0, 4 - q.shape[1]))
    state0["factor_u"] = torch.nn.functional.pad(u, (0, 4 - u.shape[1]))
    sd["state"] = {**sd["state"], 0: {f"{k}@shard0of2": v for k, v in state0.items()}}
    if where == "top level":
        sd["adapprox_format"] = 1
    else:
        sd["param_groups"] = [{**g, "adapprox_format": 1} for g in sd["param_groups"]]
    _, other = _primed("Adapprox")
    before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in other.state.items()}
    with pytest.raises(ValueError) as err:
        other.load_state_dict(sd)
    message = str(err.value)
    assert message.startswith("Invalid state_dict: it has the per-shard key '")
    assert "@shard0of2'" in message
    assert "written by an older microadam (adapprox_format 1) with another sharded layout" in (
        message
    )
    for p, st in other.state.items():
        assert all(torch.equal(v, before[id(p)][k]) for k, v in st.items())
