"""The checkpoint format details that torch.distributed.checkpoint relies on, in one process."""

from __future__ import annotations

import pytest
import torch

from microadam import MicroAdam


def _primed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = MicroAdam(model.parameters(), density=0.1, topk_block_size=32, quant_block_size=16)
    for _ in range(3):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


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
    for p, q in zip(opt.state, fresh.state, strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[q][key], value)
    adam = torch.optim.Adam(torch.nn.Linear(8, 16).parameters()).state_dict()
    with pytest.raises(ValueError, match=r"no 'microadam_format', so it looks like another"):
        fresh.load_state_dict(adam)


def test_get_and_set_optimizer_state_dict_round_trip_unsharded():
    """DSD on a plain (unsharded) model in one process: names instead of ids, same state."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model, opt = _primed()
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}
    assert set(osd["state"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    model2, opt2 = _primed()
    for p in opt2.state.values():
        for value in p.values():
            value.zero_()
    set_optimizer_state_dict(model2, opt2, osd)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype
            assert torch.equal(opt2.state[q][key], value)
