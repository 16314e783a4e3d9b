"""``nonfinite="skip"``: a step with a NaN or inf gradient changes nothing at all, warns
naming the parameter (at the caller's line), and counts itself in ``skipped_steps``, which
the state dict carries; and non-finite gradient messages name parameters by their names
when the optimizer was built from ``named_parameters()``.

Checked for MicroAdam's pure step, its fused CPU kernel (which checks the gradients itself),
a step that mixes the two (a float64 parameter, which the kernel does not cover, listed
first so that its batch would run first), Adapprox, Muon and MuonClip.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from microadam import Adapprox, MicroAdam, Muon, MuonClip, NonFiniteGradientError
from microadam.kernels import micro_adam_cpu as kernel
from microadam.optim._common import SKIPPED_STEPS, describe_param

BAD = [float("nan"), float("inf"), -float("inf")]
NEEDS_KERNEL = pytest.mark.skipif(
    kernel.unavailable_reason() is not None,
    reason=f"no fused kernel: {kernel.unavailable_reason()}",
)
SMALL_BLOCKS = dict(density=0.1, topk_block_size=128, quant_block_size=32, weight_decay=0.1)


def _param(*shape: int, seed: int, dtype=torch.float32) -> nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype))


def _micro_adam(fused, dtypes=(torch.float32, torch.float32, torch.float32), **kwargs):
    def build(nonfinite="skip"):
        params = [
            _param(n, seed=i, dtype=dt)
            for i, (n, dt) in enumerate(zip((3000, 257, 40), dtypes, strict=True))
        ]
        opt = MicroAdam(
            params, lr=1e-2, fused=fused, nonfinite=nonfinite, **{**SMALL_BLOCKS, **kwargs}
        )
        return opt, params

    return build


def _adapprox(nonfinite="skip"):
    params = [_param(20, 10, seed=0), _param(10, seed=1)]
    return Adapprox(params, lr=1e-2, max_rank=4, nonfinite=nonfinite), params


def _muon_groups():
    w, b = _param(12, 8, seed=0), _param(12, seed=1)
    return [{"params": [w], "use_muon": True}, {"params": [b], "use_muon": False}], [w, b]


def _muon(nonfinite="skip"):
    groups, params = _muon_groups()
    return Muon(groups, nonfinite=nonfinite), params


def _muonclip(nonfinite="skip"):
    groups, params = _muon_groups()
    return MuonClip(groups, nonfinite=nonfinite), params


BUILDERS: dict[str, Callable] = {
    "micro_adam-pure": _micro_adam(False),
    "micro_adam-fused": _micro_adam(True),
    "micro_adam-mixed": _micro_adam(None, (torch.float64, torch.float32, torch.bfloat16)),
    "micro_adam-stochastic-fused": _micro_adam(True, rounding="stochastic"),
    "adapprox": _adapprox,
    "muon": _muon,
    "muonclip": _muonclip,
}
BUILDER_PARAMS = [
    pytest.param(name, marks=NEEDS_KERNEL) if "fused" in name or "mixed" in name else name
    for name in BUILDERS
]


def _set_grads(params, seed: int, bad: tuple[int, float] | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if bad is not None and bad[0] == i:
            p.grad.view(-1)[p.numel() // 2] = bad[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that NaN, -0 and dtypes compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _snapshot(opt, params):
    state = {
        i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
        if p in opt.state
    }
    groups = [
        {k: v for k, v in g.items() if k not in ("params", SKIPPED_STEPS)} for g in opt.param_groups
    ]
    return [p.detach().clone() for p in params], state, groups


def _assert_unchanged(opt, params, snapshot):
    values, state, groups = snapshot
    for i, (p, before) in enumerate(zip(params, values, strict=True)):
        assert torch.equal(_bits(p), _bits(before)), f"param {i} changed"
    now = {i: opt.state[p] for i, p in enumerate(params) if p in opt.state}
    assert now.keys() == state.keys(), "the parameters with state changed"
    for i, saved in state.items():
        assert now[i].keys() == saved.keys(), f"param {i}: state keys changed"
        for key, value in saved.items():
            got = now[i][key]
            if isinstance(value, torch.Tensor):
                assert got.dtype == value.dtype, f"param {i}: {key} dtype"
                assert torch.equal(_bits(got), _bits(value)), f"param {i}: {key} changed"
            else:
                assert got == value, f"param {i}: {key} changed"
    assert [
        {k: v for k, v in g.items() if k not in ("params", SKIPPED_STEPS)} for g in opt.param_groups
    ] == groups


def _step_recording(opt) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return caught


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", BUILDER_PARAMS)
def test_skip_changes_nothing_warns_and_counts(name, bad):
    opt, params = BUILDERS[name]()
    for seed in range(2):
        _set_grads(params, seed)
        opt.step()
    snapshot = _snapshot(opt, params)
    for i in range(len(params)):
        _set_grads(params, 10 + i, bad=(i, bad))
        caught = _step_recording(opt)
        assert len(caught) == 1, [str(w.message) for w in caught]
        warning = caught[0]
        assert warning.category is RuntimeWarning
        message = str(warning.message)
        assert "non-finite gradient" in message and "the step was skipped" in message
        assert f"for {describe_param(opt.param_groups, params[i])};" in message
        assert f"(nonfinite='skip'; {i + 1} skipped so far)" in message
        assert warning.filename == __file__  # the caller's line, through torch's step hooks
        _assert_unchanged(opt, params, snapshot)
        assert opt.skipped_steps == i + 1 and type(opt.skipped_steps) is int
    # A good step afterwards is taken as if nothing had happened.
    _set_grads(params, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert all(not torch.equal(p, before) for p, before in zip(params, snapshot[0], strict=True))
    assert opt.skipped_steps == len(params)


@pytest.mark.parametrize("name", BUILDER_PARAMS)
def test_skip_at_the_first_step_creates_no_state(name):
    opt, params = BUILDERS[name]()
    snapshot = _snapshot(opt, params)
    _set_grads(params, 0, bad=(len(params) - 1, math.nan))
    assert len(_step_recording(opt)) == 1
    _assert_unchanged(opt, params, snapshot)
    assert len(opt.state) == 0
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", BUILDER_PARAMS)
def test_raise_is_the_default_and_changes_nothing(name):
    opt, params = BUILDERS[name](nonfinite="raise")
    for seed in range(2):
        _set_grads(params, seed)
        opt.step()
    snapshot = _snapshot(opt, params)
    for i in range(len(params)):
        _set_grads(params, 10 + i, bad=(i, math.inf))
        with pytest.raises(NonFiniteGradientError, match="nonfinite='skip'"):
            opt.step()
        _assert_unchanged(opt, params, snapshot)
    assert opt.skipped_steps == 0


@NEEDS_KERNEL
def test_a_bad_gradient_on_the_fused_path_leaves_the_pure_path_parameters_alone():
    # The float64 parameter comes first: its pure-step batch would run before the kernel's,
    # which only then finds the bad float32 gradient. The kernel's batches go first.
    for nonfinite in ("raise", "skip"):
        opt, params = _micro_adam(None, (torch.float64, torch.float32, torch.float32))(nonfinite)
        _set_grads(params, 0)
        opt.step()
        snapshot = _snapshot(opt, params)
        _set_grads(params, 1, bad=(1, math.nan))
        if nonfinite == "raise":
            with pytest.raises(NonFiniteGradientError, match="parameter 1 of param group 0"):
                opt.step()
        else:
            assert len(_step_recording(opt)) == 1
        _assert_unchanged(opt, params, snapshot)


@NEEDS_KERNEL
def test_skip_on_the_fused_path_takes_back_a_seed_drawn_for_this_step():
    # Rounding switched to stochastic after the first step: the seed is drawn at the next
    # step, before the kernel checks the gradients; a skipped step draws none.
    opt, params = _micro_adam(True)()
    _set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["rounding"] = "stochastic"
    snapshot = _snapshot(opt, params)
    _set_grads(params, 1, bad=(2, -math.inf))
    assert len(_step_recording(opt)) == 1
    _assert_unchanged(opt, params, snapshot)
    assert all("rng_seed" not in opt.state[p] for p in params)
    _set_grads(params, 2)
    opt.step()
    assert all("rng_seed" in opt.state[p] for p in params)


def test_muonclip_skip_neither_clips_nor_forgets_the_recorded_logits():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    params = [attn.in_proj_weight, attn.out_proj.weight]
    rest = [attn.in_proj_bias, attn.out_proj.bias]
    opt = MuonClip(
        [{"params": params, "use_muon": True}, {"params": rest, "use_muon": False}],
        qk_clip_tau=1e-3,  # every step would clip
        nonfinite="skip",
    )
    opt.watch(attn)
    x = torch.randn(2, 5, 16) * 10
    attn(x, x, x)[0].square().mean().backward()
    recorded = opt.state[attn.in_proj_weight]["qk_max_logit"].clone()
    assert bool(torch.isfinite(recorded).all())
    every = [*params, *rest]
    snapshot = _snapshot(opt, every)
    attn.in_proj_weight.grad[0, 0] = math.nan
    assert len(_step_recording(opt)) == 1
    _assert_unchanged(opt, every, snapshot)
    assert torch.equal(opt.state[attn.in_proj_weight]["qk_max_logit"], recorded)


@pytest.mark.parametrize("name", BUILDER_PARAMS)
def test_skipped_steps_survive_state_dict_deepcopy_and_old_checkpoints(name):
    build = BUILDERS[name]
    opt, params = build()
    _set_grads(params, 0)
    opt.step()
    for seed in (1, 2):
        _set_grads(params, seed, bad=(0, math.nan))
        _step_recording(opt)
    assert opt.skipped_steps == 2
    saved = opt.state_dict()
    assert all(g[SKIPPED_STEPS] == 2 for g in saved["param_groups"])

    other, _ = build()
    other.load_state_dict(saved)
    assert other.skipped_steps == 2
    assert all(g[SKIPPED_STEPS] == 2 for g in other.param_groups)
    twin = copy.deepcopy(opt)
    assert twin.skipped_steps == 2 and twin.defaults["nonfinite"] == "skip"

    # A checkpoint written before the counter existed loads with 0.
    old = {**saved, "param_groups": [
        {k: v for k, v in g.items() if k != SKIPPED_STEPS} for g in saved["param_groups"]
    ]}  # fmt: skip
    fresh, _ = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(old)
        fresh.load_state_dict(old)
    assert opt.skipped_steps == 0 and fresh.skipped_steps == 0
    assert all(g[SKIPPED_STEPS] == 0 for g in opt.param_groups)

    # Loading never changes the policy: it is this optimizer's, not the checkpoint's.
    strict, _ = build(nonfinite="raise")
    strict.load_state_dict(saved)
    assert strict.defaults["nonfinite"] == "raise" and strict.skipped_steps == 2


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_a_bad_saved_counter_is_refused(bad):
    opt, params = _micro_adam(False)()
    _set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0][SKIPPED_STEPS] = bad
    with pytest.raises(
        ValueError,
        match=rf"^Invalid state_dict: param group 0: Invalid skipped_steps: {bad!r} "
        r"\(expected an integer >= 0\)$",
    ):
        opt.load_state_dict(saved)


def test_a_group_added_later_takes_the_count():
    opt, params = _micro_adam(False)()
    _set_grads(params, 0, bad=(0, math.nan))
    _step_recording(opt)
    opt.add_param_group({"params": [_param(10, seed=9)]})
    assert [g[SKIPPED_STEPS] for g in opt.param_groups] == [1, 1]
    assert "nonfinite" not in opt.param_groups[-1]


@pytest.mark.parametrize(
    "build",
    [
        lambda p, **kw: MicroAdam(p, **kw),
        lambda p, **kw: Adapprox(p, **kw),
        lambda p, **kw: Muon(p, **kw),
        lambda p, **kw: MuonClip(p, **kw),
    ],
    ids=["micro_adam", "adapprox", "muon", "muonclip"],
)
def test_nonfinite_is_validated_and_belongs_to_the_optimizer(build):
    w = _param(4, 3, seed=0)
    for bad in ("ignore", None, True, "Skip"):
        with pytest.raises(
            ValueError, match=rf"^Invalid nonfinite: {bad!r} \(expected 'raise' or 'skip'\)$"
        ):
            build([w], nonfinite=bad)
    with pytest.raises(TypeError, match="nonfinite is an argument of the optimizer"):
        build([{"params": [w], "nonfinite": "skip"}])
    opt = build([w], nonfinite="skip")
    assert opt.defaults["nonfinite"] == "skip" and "nonfinite" not in opt.param_groups[0]
    assert opt.skipped_steps == 0


# -- non-finite gradients name the parameter ----------------------------------------------


NAME_CASES = {
    "micro_adam-pure": lambda params, **kw: MicroAdam(params, fused=False, **kw),
    "micro_adam-fused-none": lambda params, **kw: MicroAdam(params, fused=None, **kw),
    "adapprox": lambda params, **kw: Adapprox(params, **kw),
    "muon": lambda params, **kw: Muon(params, **kw),
}
NAME_PARAMS = [
    pytest.param(name, marks=NEEDS_KERNEL) if "fused" in name else name for name in NAME_CASES
]


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("name", NAME_PARAMS)
def test_non_finite_messages_name_named_parameters(name, policy):
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 4, bias=False))
    opt = NAME_CASES[name](model.named_parameters(), nonfinite=policy)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "1.weight"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[1].weight.grad[0, 0] = math.nan
    expected = "parameter '1.weight' of param group 0 (shape (4, 6))"
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError) as info:
            opt.step()
        assert expected in str(info.value)
    else:
        caught = _step_recording(opt)
        assert len(caught) == 1 and expected in str(caught[0].message)


@pytest.mark.parametrize("name", NAME_PARAMS)
def test_non_finite_messages_without_names_keep_the_index(name):
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 4, bias=False))
    opt = NAME_CASES[name](list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[1].weight.grad[0, 0] = math.inf
    with pytest.raises(
        NonFiniteGradientError, match=r"for parameter 1 of param group 0 \(shape \(4, 6\)\);"
    ):
        opt.step()
