"""Resuming with changed hyperparameters: torch's ``load_state_dict`` replaces a group's
settings with the saved ones. For the settings MicroAdam's saved state depends on
(``LAYOUT_KEYS``) that is the only way the state fits, so a changed one is kept and warned
about, one ``UserWarning`` per group and key, at the caller's line; every other setting
follows torch silently. Adapprox and Muon have no such settings (their state fits any)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from microadam import Adapprox, MicroAdam, Muon
from microadam.optim.micro_adam_state import LAYOUT_KEYS, expected_state

# A value other than the default for every layout key, as (saved, built with).
CHANGES = {
    "window_size": (10, 5),
    "density": (0.01, 0.05),
    "topk_block_size": (4096, 1024),
    "quant_block_size": (256, 64),
    "quant_bits": (4, 8),
    "error_feedback": (True, False),
    "value_dtype": (torch.bfloat16, torch.float32),
}


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5000, generator=gen)), nn.Parameter(torch.randn(300))]


def _saved(**settings) -> dict:
    params = _params()
    opt = MicroAdam(params, fused=False, **settings)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _loaded(saved: dict, **settings) -> tuple[MicroAdam, list[warnings.WarningMessage]]:
    params = _params()
    opt = MicroAdam(params, fused=False, **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved)
    for p in params:  # the loaded state steps under the kept settings
        p.grad = torch.ones_like(p)
    opt.step()
    return opt, caught


def test_layout_keys_are_what_the_state_layout_reads():
    read: set[str] = set()

    class Recording(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

    group = Recording(MicroAdam([nn.Parameter(torch.zeros(1))], rounding="stochastic").defaults)
    expected_state(10_000, group)
    # rounding only decides whether rng_seed exists, which is drawn when it is switched on
    assert read - {"rounding"} == set(LAYOUT_KEYS)
    assert set(CHANGES) == set(LAYOUT_KEYS)


@pytest.mark.parametrize("key", list(CHANGES))
def test_a_changed_layout_key_warns_once_and_keeps_the_saved_value(key):
    saved_value, own_value = CHANGES[key]
    opt, caught = _loaded(_saved(**{key: saved_value}), **{key: own_value})
    assert [w.category for w in caught] == [UserWarning]
    assert str(caught[0].message) == (
        f"MicroAdam.load_state_dict: param group 0 was saved with {key}={saved_value!r} and "
        f"this optimizer was built with {key}={own_value!r}; the saved value is kept (the "
        "saved state's layout depends on it)"
    )
    assert caught[0].filename == __file__
    assert opt.param_groups[0][key] == saved_value


def test_the_message_of_the_issue():
    _, caught = _loaded(_saved(density=0.01), density=0.05)
    assert [str(w.message) for w in caught] == [
        "MicroAdam.load_state_dict: param group 0 was saved with density=0.01 and this "
        "optimizer was built with density=0.05; the saved value is kept (the saved state's "
        "layout depends on it)"
    ]


def test_one_warning_per_group_and_key():
    params = _params()
    groups = [{"params": params[:1]}, {"params": params[1:], "window_size": 4}]
    opt = MicroAdam(groups, fused=False)
    saved = opt.state_dict()
    other = MicroAdam(
        [{"params": _params()[:1], "density": 0.1}, {"params": _params()[1:], "quant_bits": 8}],
        fused=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.load_state_dict(saved)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert "param group 0 was saved with density=0.01" in messages[0]
    assert "param group 1 was saved with window_size=4 " in messages[1]
    assert "this optimizer was built with window_size=10;" in messages[1]
    assert "param group 1 was saved with quant_bits=4 " in messages[2]


def test_same_settings_and_other_changes_load_silently():
    saved = _saved(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, density=0.05)
    params = _params()
    opt = MicroAdam(
        params,
        lr=0.1,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=0.1,
        rounding="stochastic",
        density=0.05,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved)
    group = opt.param_groups[0]  # torch's semantics: the saved values
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        1e-3,
        (0.9, 0.999),
        1e-8,
        0.0,
    )
    assert group["rounding"] == "nearest" and group["fused"] is None


def test_a_refused_load_warns_nothing():
    saved = _saved(density=0.01)
    saved["state"][1]["window_indices"] = saved["state"][1]["window_indices"][:, :1]
    opt = MicroAdam(_params(), fused=False, density=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="window_indices has shape"):
            opt.load_state_dict(saved)
    assert opt.param_groups[0]["density"] == 0.05


def test_adapprox_and_muon_follow_torch_silently():
    w = nn.Parameter(torch.randn(12, 8))
    w.grad = torch.randn(12, 8)
    adapprox = Adapprox([w], max_rank=8, rank_tolerance=0.1, min_rank=2)
    adapprox.step()
    muon = Muon([w], momentum=0.9, ns_steps=5)
    muon.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = Adapprox([w], max_rank=2, rank_tolerance=0.5, min_rank=1)
        other.load_state_dict(adapprox.state_dict())
        assert other.param_groups[0]["max_rank"] == 8
        other.step()
        other_muon = Muon([w], momentum=0.5, ns_steps=3)
        other_muon.load_state_dict(muon.state_dict())
        assert other_muon.param_groups[0]["momentum"] == 0.9
