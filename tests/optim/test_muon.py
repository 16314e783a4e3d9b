"""Muon with an AdamW fallback: equivalence with torch.optim.Muon and torch.optim.AdamW, a
slow float64 reference, Newton-Schulz properties, grouping, checkpoints and validation."""

from __future__ import annotations

import copy
import doctest
import io

import pytest
import torch
from torch import nn

import microadam.optim.muon as muon_module
from microadam.optim.muon import (
    DEFAULT_A,
    DEFAULT_B,
    DEFAULT_C,
    Muon,
    muon_param_groups,
    zeropower_via_newtonschulz,
)

HAS_TORCH_MUON = hasattr(torch.optim, "Muon")
needs_torch_muon = pytest.mark.skipif(
    not HAS_TORCH_MUON, reason="torch.optim.Muon needs torch 2.9+"
)

SHAPES = [(12, 20), (20, 12), (16, 16)]


# -- a slow float64 reference, written from the formulas of the docstring ---------------


def reference_newton_schulz(G: torch.Tensor, steps: int, coefficients, eps: float) -> torch.Tensor:
    a, b, c = coefficients
    X = G.double().clone()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.t()
    X = X / max(torch.linalg.matrix_norm(X, "fro").item(), eps)
    for _ in range(steps):
        A = X @ X.t()
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.t() if tall else X


def reference_muon_step(p, g, buf, *, lr, wd, mu, nesterov, coefficients, steps, eps, fn):
    """Returns the new (param, buffer); float64 tensors, nothing in place."""
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf if nesterov else buf
    O = reference_newton_schulz(u, steps, coefficients, eps)
    rows, cols = p.shape
    if fn == "match_rms_adamw":
        scale = 0.2 * max(rows, cols) ** 0.5
    else:
        scale = max(1.0, rows / cols) ** 0.5
    return p * (1 - lr * wd) - lr * scale * O, buf


def _grads(shape, steps, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(steps)]


# -- (1) equivalence with torch.optim.Muon ------------------------------------------------


@needs_torch_muon
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.02, weight_decay=0.0, nesterov=True, adjust_lr_fn=None),
        dict(lr=0.02, weight_decay=0.1, nesterov=False, adjust_lr_fn="original"),
        dict(lr=1e-3, weight_decay=0.1, nesterov=True, adjust_lr_fn="match_rms_adamw"),
    ],
)
def test_matches_torch_muon_in_bf16(shape, hyper):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    ours_p = w0.clone().requires_grad_()
    torch_p = w0.clone().requires_grad_()
    ours = Muon([ours_p], momentum=0.9, **hyper)
    theirs = torch.optim.Muon([torch_p], momentum=0.9, **hyper)
    for g in _grads(shape, 20):
        ours_p.grad, torch_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # Both run Newton-Schulz in bf16; allow a bf16-rounding-sized drift over 20 steps
    # (with torch 2.13 the two are bit-identical: max difference 0).
    torch.testing.assert_close(ours_p, torch_p, atol=1e-3, rtol=0)
    torch.testing.assert_close(
        ours.state[ours_p]["momentum_buffer"], theirs.state[torch_p]["momentum_buffer"]
    )


@needs_torch_muon
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_in_float64_with_its_newton_schulz_swapped(shape, nesterov, monkeypatch):
    # torch.optim.Muon always runs Newton-Schulz in bf16. To compare everything else
    # (momentum, Nesterov, lr adjustment, weight decay) in float64, swap in our
    # Newton-Schulz at float64 on torch's side; it is checked against the reference below.
    torch_muon = pytest.importorskip("torch.optim._muon")
    if not hasattr(torch_muon, "_zeropower_via_newtonschulz"):
        pytest.skip("torch.optim._muon has no _zeropower_via_newtonschulz to swap")

    def ns64(grad, ns_coefficients, ns_steps, eps):
        return zeropower_via_newtonschulz(grad, ns_steps, ns_coefficients, eps, torch.float64)

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", ns64)
    torch.manual_seed(1)
    w0 = torch.randn(shape, dtype=torch.float64)
    ours_p = w0.clone().requires_grad_()
    torch_p = w0.clone().requires_grad_()
    hyper = dict(lr=0.03, weight_decay=0.05, momentum=0.9, nesterov=nesterov)
    ours = Muon([ours_p], ns_dtype=torch.float64, **hyper)
    theirs = torch.optim.Muon([torch_p], **hyper)
    for g in _grads(shape, 20, torch.float64, seed=1):
        ours_p.grad, torch_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(ours_p, torch_p)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "hyper",
    [
        dict(lr=0.02, wd=0.0, mu=0.95, nesterov=True, fn=None),
        dict(lr=0.05, wd=0.1, mu=0.9, nesterov=False, fn="original"),
        dict(lr=0.01, wd=0.1, mu=0.5, nesterov=True, fn="match_rms_adamw"),
    ],
)
def test_float64_matches_slow_reference(shape, hyper):
    torch.manual_seed(2)
    w0 = torch.randn(shape, dtype=torch.float64)
    p = w0.clone().requires_grad_()
    opt = Muon(
        [p],
        lr=hyper["lr"],
        weight_decay=hyper["wd"],
        momentum=hyper["mu"],
        nesterov=hyper["nesterov"],
        adjust_lr_fn=hyper["fn"],
        ns_dtype=torch.float64,
    )
    ref_p, ref_buf = w0.clone(), torch.zeros_like(w0)
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    for g in _grads(shape, 20, torch.float64, seed=2):
        p.grad = g.clone()
        opt.step()
        ref_p, ref_buf = reference_muon_step(
            ref_p, g, ref_buf, coefficients=coefficients, steps=5, eps=1e-7, **hyper
        )
        torch.testing.assert_close(p.detach(), ref_p, atol=1e-12, rtol=0)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_buf, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [*SHAPES, (1, 7), (7, 1)])
def test_newton_schulz_float64_matches_reference(shape):
    G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    ours = zeropower_via_newtonschulz(G, 5, coefficients, 1e-7, torch.float64)
    torch.testing.assert_close(
        ours, reference_newton_schulz(G, 5, coefficients, 1e-7), atol=1e-13, rtol=0
    )


# -- (2) what Newton-Schulz promises ------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (16, 64), (100, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_quintic_singular_values_in_band(shape, dtype):
    # Torch's quintic is tuned for slope at zero, not convergence: five steps put the
    # singular values in a band around 1 (measured [0.676, 1.141] on these shapes). The
    # shapes are rectangular so that the smallest normalized singular value is not tiny.
    G = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    X = zeropower_via_newtonschulz(G, dtype=dtype)
    assert X.dtype == dtype and X.shape == G.shape
    s = torch.linalg.svdvals(X.double())
    assert s.min() > 0.65 and s.max() < 1.2, (s.min().item(), s.max().item())
    # Same singular vectors as G: X is close to U diag(s') V^T, so U^T X V is diagonal.
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    core = U.T @ X.double() @ Vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (24, 24 + 16)])
def test_newton_schulz_cubic_converges_to_orthogonal(shape):
    G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    X = zeropower_via_newtonschulz(G, steps=40, coefficients=(1.5, -0.5, 0.0), dtype=torch.float64)
    gram = X @ X.T if shape[0] <= shape[1] else X.T @ X
    torch.testing.assert_close(gram, torch.eye(min(shape), dtype=gram.dtype), atol=1e-3, rtol=0)
    # ... and it is the orthogonal factor U V^T of the polar decomposition.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(X, U @ Vh, atol=1e-3, rtol=0)
    # Five cubic steps are far from converged: the quintic exists to need fewer.
    X5 = zeropower_via_newtonschulz(G, steps=5, coefficients=(1.5, -0.5, 0.0), dtype=torch.float64)
    assert torch.linalg.svdvals(X5).min() < 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_newton_schulz_never_writes_its_input(dtype):
    G = torch.randn(8, 5, dtype=dtype)
    before = G.clone()
    X = zeropower_via_newtonschulz(G, dtype=dtype)
    assert torch.equal(G, before)
    assert X.data_ptr() != G.data_ptr()


def test_newton_schulz_zero_matrix_maps_to_zero_and_bad_input_raises():
    assert torch.equal(zeropower_via_newtonschulz(torch.zeros(3, 4)), torch.zeros(3, 4).bfloat16())
    with pytest.raises(ValueError, match=r"Invalid G: a tensor of shape \(3,\) "):
        zeropower_via_newtonschulz(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid steps: -1 \(expected an integer >= 0\)"):
        zeropower_via_newtonschulz(torch.zeros(3, 3), steps=-1)


# -- (3) AdamW groups are torch.optim.AdamW -----------------------------------------------


def test_adamw_groups_match_torch_adamw_exactly():
    torch.manual_seed(6)
    shapes = [(7,), (3, 4), (2, 3, 5), ()]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours_ps = [w.clone().requires_grad_() for w in init]
    torch_ps = [w.clone().requires_grad_() for w in init]
    ours = Muon(
        [
            {"params": ours_ps[:2], "use_muon": False},
            {"params": ours_ps[2:], "use_muon": False, "lr": 1e-2, "betas": (0.8, 0.99)},
        ],
        adamw_lr=3e-3,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-6,
        adamw_weight_decay=0.1,
    )
    theirs = torch.optim.AdamW(
        [
            {"params": torch_ps[:2]},
            {"params": torch_ps[2:], "lr": 1e-2, "betas": (0.8, 0.99)},
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-6,
        weight_decay=0.1,
        foreach=False,
    )
    gen = torch.Generator().manual_seed(6)
    for _ in range(20):
        for a, b in zip(ours_ps, torch_ps, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_ps, torch_ps, strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[a][key], theirs.state[b][key])


@needs_torch_muon
def test_one_object_equals_torch_muon_plus_torch_adamw():
    torch.manual_seed(7)
    model = _MLP()
    ours_model, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = Muon(muon_param_groups(ours_model), lr=0.02, weight_decay=0.01, adamw_lr=1e-3)
    groups = muon_param_groups(torch_model)
    theirs_muon = torch.optim.Muon(groups[0]["params"], lr=0.02, weight_decay=0.01)
    theirs_adamw = torch.optim.AdamW(
        groups[1]["params"], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=False
    )
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs_muon.step()
        theirs_adamw.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


# -- (4) grouping and a mixed model that learns -------------------------------------------


class _MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.norm(self.fc1(x))))))


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.pos_emb = nn.Parameter(torch.zeros(5, 8))  # 2-D, owned by no Embedding
        self.block = nn.ModuleDict(
            {"attn": nn.Linear(8, 24, bias=False), "proj": nn.Linear(8, 8), "ln": nn.LayerNorm(8)}
        )
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.classifier = nn.Linear(8, 3)
        self.mlp_out = nn.Linear(8, 8)  # registered last: rule 3 makes it the head
        self.gain = nn.Parameter(torch.ones(()))


def _ids(params):
    return {id(p) for p in params}


def test_muon_param_groups_routing_of_a_module():
    m = _TinyLM()
    groups = muon_param_groups(m)
    assert [g["use_muon"] for g in groups] == [True, False]
    assert _ids(groups[0]["params"]) == _ids([m.block["attn"].weight, m.block["proj"].weight])
    adamw = _ids(groups[1]["params"])
    assert id(m.wte.weight) in adamw  # nn.Embedding, tied to lm_head
    assert id(m.pos_emb) in adamw  # 2-D, but named like an embedding
    assert id(m.classifier.weight) in adamw and id(m.mlp_out.weight) in adamw
    assert id(m.block["ln"].weight) in adamw and id(m.block["proj"].bias) in adamw
    assert id(m.gain) in adamw
    # Every parameter appears exactly once, tied weights included.
    everything = groups[0]["params"] + groups[1]["params"]
    assert len(everything) == len(_ids(everything)) == len(list(m.parameters()))


def test_muon_param_groups_rules_one_by_one():
    m = _TinyLM()
    # Rule 3 off: the last Linear (mlp_out) is a hidden matrix again.
    groups = muon_param_groups(m, last_linear_is_head=False)
    assert id(m.mlp_out.weight) in _ids(groups[0]["params"])
    # Named pairs: only rules 1 and 4; "wte" is then unknown, "lm_head" still routes it.
    named = list(m.named_parameters(remove_duplicate=False))
    groups = muon_param_groups(named)
    assert id(m.wte.weight) in _ids(groups[1]["params"])
    assert id(m.mlp_out.weight) in _ids(groups[0]["params"])
    # Without the tie, "wte" is just a 2-D name: only module input knows it is an Embedding.
    assert id(m.wte.weight) in _ids(muon_param_groups([("wte.weight", m.wte.weight)])[0]["params"])
    # Custom head names, and the embedding substring.
    named = [
        ("enc.embed_tokens.weight", torch.zeros(4, 4)),
        ("mlp.fc_out.weight", torch.zeros(4, 4)),
    ]
    muon_ids = _ids(muon_param_groups(named)[0]["params"])
    assert muon_ids == {id(named[1][1])}
    custom = muon_param_groups(named, head_names=("fc_out",))
    assert custom[0]["params"] == []
    # Options go into the groups; the flags cannot be overridden.
    groups = muon_param_groups(
        m, muon_options={"lr": 0.05, "use_muon": False}, adamw_options={"lr": 1e-3}
    )
    assert groups[0]["lr"] == 0.05 and groups[0]["use_muon"] is True and groups[1]["lr"] == 1e-3


def test_mixed_mlp_loss_decreases():
    torch.manual_seed(8)
    model = _MLP()
    teacher = _MLP()
    x = torch.randn(64, 8)
    with torch.no_grad():
        y = teacher(x)
    opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-3)
    assert _ids(opt.param_groups[0]["params"]) == _ids([model.fc1.weight, model.fc2.weight])
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


# -- (5) checkpoints --------------------------------------------------------------------


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_state_dict_round_trip_weights_only_continues_identically():
    torch.manual_seed(9)
    model = _MLP()
    kwargs = dict(lr=0.02, weight_decay=0.01, adamw_lr=1e-3, adamw_weight_decay=0.1)
    opt = Muon(muon_param_groups(model), **kwargs)
    _train(model, opt, 10, seed=1)

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for state in loaded["state"].values():
        assert all(isinstance(v, torch.Tensor | int | float) for v in state.values())

    resumed_model = copy.deepcopy(model)
    resumed = Muon(muon_param_groups(resumed_model), lr=0.5, adamw_lr=0.5)  # overwritten
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["lr"] == 0.02 and resumed.param_groups[1]["lr"] == 1e-3
    # Private buffers: nothing is shared with the loaded dict or the first optimizer.
    for p in resumed_model.parameters():
        for value in resumed.state[p].values():
            for other in loaded["state"].values():
                assert all(value.data_ptr() != o.data_ptr() for o in other.values())

    _train(model, opt, 10, seed=2)
    _train(resumed_model, resumed, 10, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == resumed.state_dict()["param_groups"]


def test_in_memory_load_does_not_share_buffers():
    model = _MLP()
    opt = Muon(muon_param_groups(model))
    _train(model, opt, 2, seed=3)
    other = Muon(muon_param_groups(model))
    other.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert other.state[p][key].data_ptr() != value.data_ptr()


def test_load_state_dict_rejects_mismatches():
    model = _MLP()
    opt = Muon(muon_param_groups(model))
    _train(model, opt, 1, seed=4)
    sd = opt.state_dict()
    swapped = copy.deepcopy(sd)
    swapped["param_groups"][1]["use_muon"] = True
    fresh = Muon(muon_param_groups(model))
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(swapped)
    assert str(info.value) == (
        "Invalid state_dict: param group 1: it has use_muon=True, the optimizer's has "
        "use_muon=False"
    )
    bad_momentum = copy.deepcopy(sd)
    bad_momentum["param_groups"][0]["momentum"] = 1.5
    with pytest.raises(ValueError) as info:
        fresh.load_state_dict(bad_momentum)
    assert str(info.value) == (
        "Invalid state_dict: param group 0: Invalid momentum: 1.5 (expected 0 <= momentum < 1)"
    )
    bad_shape = copy.deepcopy(sd)
    pid = bad_shape["param_groups"][0]["params"][0]
    bad_shape["state"][pid]["momentum_buffer"] = torch.zeros(2, 2)
    with pytest.raises(
        ValueError,
        match=(
            r"momentum_buffer of parameter 0 of param group 0 \(shape \(32, 8\)\) "
            r"has shape \(2, 2\)"
        ),
    ):
        fresh.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="it has 1 param groups, the optimizer has 2"):
        fresh.load_state_dict({**sd, "param_groups": sd["param_groups"][:1]})
    assert len(fresh.state) == 0


# -- (6) gradients, validation ------------------------------------------------------------


def test_grad_unchanged_and_none_grad_skipped():
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    idle = torch.randn(3, 3, requires_grad=True)
    opt = Muon([{"params": [w, idle]}, {"params": [b], "use_muon": False}])
    w.grad, b.grad = torch.randn(6, 4), torch.randn(4)
    grads = (w.grad.clone(), b.grad.clone())
    idle_before = idle.detach().clone()
    for _ in range(3):
        opt.step()
    assert torch.equal(w.grad, grads[0]) and torch.equal(b.grad, grads[1])
    assert torch.equal(idle, idle_before) and idle not in opt.state
    # bf16 parameters without Nesterov: the momentum buffer is the update itself and must
    # survive Newton-Schulz (which works on a copy).
    p = torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = Muon([p], nesterov=False, momentum=0.5)
    p.grad = torch.ones(5, 3, dtype=torch.bfloat16)
    opt.step()
    assert torch.equal(
        opt.state[p]["momentum_buffer"], torch.full((5, 3), 0.5, dtype=torch.bfloat16)
    )


def test_zero_gradient_moves_only_by_weight_decay():
    w = torch.randn(4, 6, requires_grad=True)
    opt = Muon([w], lr=0.1, weight_decay=0.5)
    w0 = w.detach().clone()
    w.grad = torch.zeros(4, 6)
    opt.step()
    assert torch.equal(w.detach(), w0 * (1 - 0.1 * 0.5))


INVALID = [
    (dict(lr=-1.0), "Invalid lr: -1.0 (expected lr >= 0)"),
    (dict(weight_decay=-0.1), "Invalid weight_decay: -0.1 (expected weight_decay >= 0)"),
    (dict(momentum=1.0), "Invalid momentum: 1.0 (expected 0 <= momentum < 1)"),
    (dict(momentum=-0.5), "Invalid momentum: -0.5 (expected 0 <= momentum < 1)"),
    (dict(nesterov=1), "Invalid nesterov: 1 (expected True or False)"),
    (
        dict(ns_coefficients=(1.0, 2.0)),
        "Invalid ns_coefficients: (1.0, 2.0) (expected a tuple of three floats)",
    ),
    (dict(eps=0.0), "Invalid eps: 0.0 (expected eps > 0)"),
    (dict(ns_steps=0), "Invalid ns_steps: 0 (expected an integer >= 1)"),
    (dict(ns_steps=2.0), "Invalid ns_steps: 2.0 (expected an integer >= 1)"),
    (
        dict(adjust_lr_fn="rms"),
        "Invalid adjust_lr_fn: 'rms' (expected None, 'original' or 'match_rms_adamw')",
    ),
    (
        dict(ns_dtype=torch.int32),
        "Invalid ns_dtype: torch.int32 (expected torch.bfloat16, torch.float16, "
        "torch.float32 or torch.float64)",
    ),
    (dict(adamw_lr=-3e-4), "Invalid adamw_lr: -0.0003 (expected adamw_lr >= 0)"),
    (dict(adamw_betas=(0.9,)), "Invalid adamw_betas: (0.9,) (expected a pair of floats)"),
    (
        dict(adamw_betas=(0.9, 1.0)),
        "Invalid beta parameter at index 1: 1.0 (expected 0 <= beta < 1)",
    ),
    (dict(adamw_eps=-1e-8), "Invalid adamw_eps: -1e-08 (expected adamw_eps >= 0)"),
    (
        dict(adamw_weight_decay=-1.0),
        "Invalid adamw_weight_decay: -1.0 (expected adamw_weight_decay >= 0)",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), INVALID)
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError) as info:
        Muon([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    assert str(info.value) == message


def test_invalid_group_values():
    w = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as info:
        Muon([{"params": [b], "use_muon": False, "betas": (0.9, -0.1)}])
    assert str(info.value) == "Invalid beta parameter at index 1: -0.1 (expected 0 <= beta < 1)"
    with pytest.raises(ValueError) as info:
        Muon([{"params": [w], "use_muon": "yes"}])
    assert str(info.value) == "Invalid use_muon: 'yes' (expected True or False)"
    with pytest.raises(ValueError) as info:
        Muon([{"params": [w], "lr": torch.tensor([1.0, 2.0])}])
    assert str(info.value) == "Invalid lr: tensor lr must have one element, got shape (2,)"


def test_non_matrix_in_muon_group_raises_naming_the_shape():
    with pytest.raises(ValueError, match=r"found one of shape \(4,\)"):
        Muon([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match=r"param group 1: .*found one of shape \(2, 3, 4\)"):
        Muon(
            [
                {"params": [torch.zeros(2, 2, requires_grad=True)]},
                {"params": [torch.zeros(2, 3, 4, requires_grad=True)], "use_muon": True},
            ]
        )


def test_unknown_or_misplaced_arguments_raise_type_error():
    w = torch.zeros(2, 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError):
        Muon([w], betas=(0.9, 0.95))
    with pytest.raises(TypeError, match=r"a Muon group \(use_muon=True\) does not take 'betas'"):
        Muon([{"params": [w], "betas": (0.9, 0.95)}])
    with pytest.raises(TypeError, match=r"an AdamW group .* does not take 'momentum'"):
        Muon([{"params": [b], "use_muon": False, "momentum": 0.9}])
    with pytest.raises(TypeError, match="does not take 'adamw_lr'"):
        Muon([{"params": [b], "use_muon": False, "adamw_lr": 0.1}])


def test_add_param_group_keeps_groups_clean_and_state_unchanged_on_error():
    w = torch.zeros(3, 2, requires_grad=True)
    caller_group = {"params": [torch.zeros(3, requires_grad=True)], "use_muon": False}
    opt = Muon([w], adamw_lr=1e-3)
    opt.add_param_group(caller_group)
    assert set(caller_group) == {"params", "use_muon"}  # the caller's dict is untouched
    muon_keys = {
        "params", "use_muon", "lr", "weight_decay", "momentum", "nesterov", "ns_coefficients",
        "ns_steps", "eps", "adjust_lr_fn", "ns_dtype", "skipped_steps",
    }  # fmt: skip
    assert set(opt.param_groups[0]) == muon_keys
    assert set(opt.param_groups[1]) == {
        "params", "use_muon", "lr", "betas", "eps", "weight_decay", "skipped_steps",
    }  # fmt: skip
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["eps"] == 1e-8
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [torch.zeros(5, requires_grad=True)]})
    assert len(opt.param_groups) == 2


def test_sparse_and_complex_raise_runtime_error():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = Muon([{"params": emb.parameters(), "use_muon": False}])
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)
    with pytest.raises(RuntimeError, match="complex parameters"):
        Muon(
            [
                {
                    "params": [torch.zeros(2, dtype=torch.cfloat, requires_grad=True)],
                    "use_muon": False,
                }
            ]
        )


def test_tensor_lr_and_closure():
    w = torch.randn(4, 3, requires_grad=True)
    opt = Muon([w], lr=torch.tensor(0.01))

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    assert opt.step(closure) < first


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(muon_module.Muon, "Muon", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
