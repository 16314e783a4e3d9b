"""Adapprox: full-rank equivalence with a dense reference, clamping, memory, adaptive rank,
checkpoints, and the generic optimizer contract."""

import io
import math

import pytest
import torch

from microadam.compress.low_rank import adaptive_low_rank, candidate_ranks
from microadam.memory import state_bytes
from microadam.optim.adapprox import Adapprox, matrix_shape
from reference.adapprox_reference import DenseAdapproxReference

SHAPES = [(7, 5), (4, 9), (3, 2, 4), (6,), ()]  # matrices both ways, a 3-D tensor, 1-D, 0-D


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny QRs with several BLAS threads on a busy 2-core machine spin for milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the sketch generators are seeded from the default generator
    yield
    torch.set_num_threads(threads)


def _params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _set_grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return [p.grad.clone() for p in params]


# -- (1) full rank equals the dense rule --------------------------------------------------


@pytest.mark.parametrize(
    "betas, clip, maximize",
    [((0.9, 0.99), 1.0, False), ((None, 0.999), None, True), ((0.0, 0.9), 0.5, False)],
)
@pytest.mark.parametrize("floor", ["gradient", "zero"])
def test_full_rank_equals_dense_reference(betas, clip, maximize, floor):
    params = _params(SHAPES)
    hyper = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1, clip_threshold=clip)
    ref = DenseAdapproxReference(params, maximize=maximize, **hyper)
    opt = Adapprox(
        params,
        min_rank=9,  # >= min(m, n) of every matrix: each is factored at full rank
        max_rank=9,
        oversampling=2,
        power_iterations=1,
        second_moment_floor=floor,
        maximize=maximize,
        **hyper,
    )
    for step in range(20):
        grads = _set_grads(params, step)
        opt.step()
        ref.step(grads)
        for i, (p, want) in enumerate(zip(params, ref.params, strict=True)):
            torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)
            shape = matrix_shape(p)
            state = opt.state[p]
            if shape is not None:
                assert state["factor_q"].shape[1] == min(shape)
                v = state["factor_q"] @ state["factor_u"].T
                torch.testing.assert_close(
                    v, ref.second_moments[i].reshape(shape), rtol=1e-9, atol=1e-14
                )
            else:
                torch.testing.assert_close(state["exp_avg_sq"], ref.second_moments[i])


# -- (2) clamping -------------------------------------------------------------------------


def _negative_reconstruction_case():
    """A 6 x 5 gradient whose square's best rank-2 approximation is about -0.18 at entries
    where the gradient is not zero (found by search; sigma_3 / sigma_2 < 0.25, so rank-2
    subspace iteration lands on that truncation whatever the sketch)."""
    return torch.tensor(
        [
            [3.0, 2.0, 2.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 1.0, 0.0],
            [1.0, 2.0, 1.0, 2.0, 3.0],
            [1.0, 0.0, 0.0, 0.0, 2.0],
            [0.0, 2.0, 0.0, 2.0, 3.0],
            [3.0, 3.0, 2.0, 0.0, 2.0],
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("floor", ["gradient", "zero"])
def test_negative_low_rank_reconstruction_is_clamped(floor):
    g = _negative_reconstruction_case()
    p = torch.zeros_like(g, requires_grad=True)
    eps, beta2 = 1e-8, 0.0  # V_1 = g^2 exactly, so the rank-2 factors are its truncation
    opt = Adapprox(
        [p],
        lr=1.0,
        betas=(None, beta2),
        eps=eps,
        clip_threshold=None,
        min_rank=2,
        max_rank=2,
        power_iterations=3,
        second_moment_floor=floor,
    )
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    recon = state["factor_q"] @ state["factor_u"].T
    negative = recon < -0.1
    assert (g[negative] != 0).any(), "the case must be negative where the gradient is not"
    direction = -p.detach()  # lr 1, no momentum, no clipping, no decay
    assert torch.isfinite(direction).all()
    assert torch.equal(direction[g == 0], torch.zeros_like(g[g == 0]))
    # Recover the V that was used where g != 0: direction = g / (sqrt(V) + eps).
    nz = g != 0
    sqrt_v = g[nz] / direction[nz] - eps
    assert (sqrt_v >= -1e-12).all()
    floor_value = (1 - beta2) * g * g if floor == "gradient" else torch.zeros_like(g)
    torch.testing.assert_close(
        sqrt_v.square(), torch.maximum(recon, floor_value)[nz], rtol=1e-6, atol=1e-12
    )
    if floor == "gradient":
        assert direction.abs().max() <= 1 / math.sqrt(1 - beta2) + 1e-12


# -- (3) memory and adaptive rank ---------------------------------------------------------


@pytest.mark.parametrize("beta1", [0.9, None])
def test_state_bytes_follow_the_formula(beta1):
    m, n = 48, 40
    w = torch.zeros(m, n, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = Adapprox([w, b], betas=(beta1, 0.999), min_rank=2, max_rank=12, rank_step=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        w.grad = torch.randn(m, n, generator=gen)
        b.grad = torch.randn(n, generator=gen)
        opt.step()
    k = opt.state[w]["factor_q"].shape[1]
    assert 2 <= k <= 12
    rng_bytes = opt.state[w]["rng_state"].numel()  # uint8, 5056 for a CPU generator
    assert opt.state[w]["rng_state"].dtype == torch.uint8
    first = beta1 is not None
    expected_w = 4 * k * (m + n) + (4 * m * n if first else 0) + 4 + rng_bytes
    expected_b = 4 * n + (4 * n if first else 0) + 4
    assert state_bytes(opt) == expected_w + expected_b
    assert set(opt.state[w]) == {"step", "factor_q", "factor_u", "rng_state"} | (
        {"exp_avg"} if first else set()
    )
    assert set(opt.state[b]) == {"step", "exp_avg_sq"} | ({"exp_avg"} if first else set())


def test_adaptive_rank_follows_the_gradient_structure():
    m, n = 40, 32
    gen = torch.Generator().manual_seed(3)
    low = torch.zeros(m, n, requires_grad=True)
    full = torch.zeros(m, n, requires_grad=True)
    opt = Adapprox([low, full], min_rank=1, max_rank=16, rank_step=2, rank_tolerance=0.05)
    ranks_low, ranks_full = [], []
    for _ in range(5):
        # A rank-1 gradient has a rank-1 square, and rank-1 moments stay rank 1 when the
        # factors do; a Gaussian gradient's square needs far more.
        low.grad = torch.outer(torch.randn(m, generator=gen), torch.randn(n, generator=gen))
        full.grad = torch.randn(m, n, generator=gen)
        opt.step()
        ranks_low.append(opt.state[low]["factor_q"].shape[1])
        ranks_full.append(opt.state[full]["factor_q"].shape[1])
    allowed = set(candidate_ranks(m, n, 1, 16, 2))
    assert set(ranks_low) | set(ranks_full) <= allowed
    # After t steps the moment is a sum of t rank-1 squares: rank <= t, rounded up to the
    # next candidate (1, 3, 5, ...).
    assert all(k <= 2 * t + 1 for t, k in enumerate(ranks_low))
    assert ranks_low[0] == 1
    assert ranks_full == [16] * 5


def test_candidate_ranks_and_search_bounds():
    assert candidate_ranks(100, 80, 1, 32, 4) == [1, 5, 9, 13, 17, 21, 25, 29, 32]
    assert candidate_ranks(10, 6, 2, 32, 4) == [2, 6]
    assert candidate_ranks(10, 6, 8, 32, 4) == [6]
    assert candidate_ranks(50, 50, 4, 4, 1) == [4]
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(30, 20, generator=gen, dtype=torch.float64)
    for tol in (0.0, 0.05, 0.3, 1.0):
        q, u, err = adaptive_low_rank(
            a,
            min_rank=2,
            max_rank=12,
            rank_step=2,
            rank_tolerance=tol,
            power_iterations=1,
            oversampling=0,
            generator=gen,
        )
        k = q.shape[1]
        assert k in candidate_ranks(30, 20, 2, 12, 2)
        true_err = float(torch.linalg.norm(a - q @ u.T) / torch.linalg.norm(a))
        assert err == pytest.approx(true_err, abs=1e-9)
        assert err <= tol or k == 12
        torch.testing.assert_close(q.T @ q, torch.eye(k, dtype=a.dtype), atol=1e-12, rtol=0)
    assert adaptive_low_rank(
        torch.zeros(5, 4),
        min_rank=2,
        max_rank=3,
        rank_step=1,
        rank_tolerance=0.1,
        power_iterations=1,
        oversampling=0,
    )[2] == pytest.approx(0.0)


def test_higher_dimensional_parameters_are_factored_as_first_dim_by_rest():
    p = torch.zeros(5, 3, 2, 2, requires_grad=True)
    opt = Adapprox([p], max_rank=3)
    p.grad = torch.randn(5, 3, 2, 2)
    opt.step()
    assert matrix_shape(p) == (5, 12)
    assert opt.state[p]["factor_q"].shape[0] == 5
    assert opt.state[p]["factor_u"].shape[0] == 12
    assert opt.state[p]["factor_q"].shape[1] <= 3


# -- (4) checkpoints ----------------------------------------------------------------------


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_resume_is_bit_identical():
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 12, generator=gen), torch.randn(32, 3, generator=gen)
    model = _model(0)
    kw = dict(lr=1e-2, weight_decay=0.01, max_rank=6, rank_step=2, rank_tolerance=0.2)
    opt = Adapprox(model.parameters(), **kw)
    _train(model, opt, 10, x, y)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    clone = _model(1)
    clone.load_state_dict(model.state_dict())
    opt2 = Adapprox(clone.parameters(), **kw)
    opt2.load_state_dict(loaded)
    for p in clone.parameters():
        state = opt2.state[p]
        if "rng_state" in state:
            assert state["rng_state"].dtype == torch.uint8
            assert state["rng_state"].device.type == "cpu"

    torch.manual_seed(123)  # the default generator must not matter after the state exists
    _train(model, opt, 10, x, y)
    torch.manual_seed(456)
    _train(clone, opt2, 10, x, y)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
        s1, s2 = opt.state[p], opt2.state[q]
        assert s1.keys() == s2.keys()
        for key in s1:
            assert s1[key].dtype == s2[key].dtype
            assert torch.equal(s1[key], s2[key]), key


def test_load_state_dict_keeps_float32_factors_of_bf16_parameters():
    p = torch.zeros(6, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = Adapprox([p], max_rank=2)
    p.grad = torch.randn(6, 4).to(torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    p2 = p.detach().clone().requires_grad_()
    opt2 = Adapprox([p2], max_rank=2)
    opt2.load_state_dict(sd)
    for key, value in opt.state[p].items():
        assert opt2.state[p2][key].dtype == value.dtype
        assert torch.equal(opt2.state[p2][key], value)
    assert opt2.state[p2]["factor_q"].dtype == torch.float32


def test_manual_seed_makes_runs_repeatable():
    def run():
        torch.manual_seed(0)
        p = torch.zeros(10, 8, requires_grad=True)
        opt = Adapprox([p], max_rank=4, rank_tolerance=0.0)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            p.grad = torch.randn(10, 8, generator=gen)
            opt.step()
        return p.detach().clone(), opt.state[p]["factor_q"].clone()

    (p1, q1), (p2, q2) = run(), run()
    assert torch.equal(p1, p2) and torch.equal(q1, q2)


def test_load_state_dict_rejects_mismatched_state():
    p = torch.zeros(6, 4, requires_grad=True)
    opt = Adapprox([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    sd = opt.state_dict()
    other = Adapprox([torch.zeros(5, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="factor_q has shape"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="adapprox_format"):
        other.load_state_dict(torch.optim.Adam([p]).state_dict())


# -- (5) the optimizer contract -----------------------------------------------------------


def test_loss_decreases_on_a_small_regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=gen)
    y = x @ torch.randn(16, 4, generator=gen) + 0.1 * torch.randn(128, 4, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = Adapprox(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_step_does_not_touch_grad_and_skips_params_without_grad():
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    frozen = torch.randn(3, 3, requires_grad=True)
    opt = Adapprox([w, b, frozen], weight_decay=0.1)
    w.grad, b.grad = torch.randn(5, 4), torch.randn(4)
    grads = [w.grad.clone(), b.grad.clone()]
    before = frozen.detach().clone()
    data_ptrs = [w.grad.data_ptr(), b.grad.data_ptr()]
    opt.step()
    assert torch.equal(w.grad, grads[0]) and torch.equal(b.grad, grads[1])
    assert [w.grad.data_ptr(), b.grad.data_ptr()] == data_ptrs
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0


def test_closure_and_zero_gradient():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = Adapprox([p])

    def closure():
        opt.zero_grad()
        loss = (p * 0).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 0.0
    assert torch.equal(p, torch.zeros(4, 3))  # zero gradient: zero step, finite


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid lr: -1.0 (expected lr >= 0)"),
        (dict(betas=(0.9,)), "Invalid betas: (0.9,) (expected a pair of floats)"),
        (
            dict(betas=(1.0, 0.999)),
            "Invalid beta parameter at index 0: 1.0 (expected None or 0 <= beta < 1)",
        ),
        (
            dict(betas=(0.9, -0.1)),
            "Invalid beta parameter at index 1: -0.1 (expected 0 <= beta < 1)",
        ),
        (dict(eps=0.0), "Invalid eps: 0.0 (expected eps > 0)"),
        (dict(weight_decay=-0.1), "Invalid weight_decay: -0.1 (expected weight_decay >= 0)"),
        (
            dict(clip_threshold=0.0),
            "Invalid clip_threshold: 0.0 (expected None or clip_threshold > 0)",
        ),
        (dict(min_rank=0), "Invalid min_rank: 0 (expected an integer >= 1)"),
        (dict(min_rank=2.0), "Invalid min_rank: 2.0 (expected an integer >= 1)"),
        (
            dict(min_rank=8, max_rank=4),
            "Invalid max_rank: 4 (expected an integer >= min_rank = 8)",
        ),
        (dict(rank_step=0), "Invalid rank_step: 0 (expected an integer >= 1)"),
        (
            dict(rank_tolerance=1.5),
            "Invalid rank_tolerance: 1.5 (expected 0 <= rank_tolerance <= 1)",
        ),
        (dict(power_iterations=-1), "Invalid power_iterations: -1 (expected an integer >= 0)"),
        (dict(oversampling=True), "Invalid oversampling: True (expected an integer >= 0)"),
        (
            dict(second_moment_floor="one"),
            "Invalid second_moment_floor: 'one' (expected 'gradient' or 'zero')",
        ),
        (dict(maximize=1), "Invalid maximize: 1 (expected True or False)"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(ValueError) as info:
        Adapprox([p], **kwargs)
    assert str(info.value) == message
    opt = Adapprox([p])
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert str(info.value) == message


def test_unknown_keyword_and_unsupported_tensors():
    p = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(TypeError):
        Adapprox([p], rank=4)
    with pytest.raises(RuntimeError, match="complex"):
        Adapprox([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    opt = Adapprox([p])
    p.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    p.grad = torch.full((3, 3), float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert torch.equal(p, torch.zeros(3, 3)) and len(opt.state[p]) == 0


def test_param_groups_keep_their_own_lr():
    a = torch.ones(4, 3, requires_grad=True)
    b = torch.ones(4, 3, requires_grad=True)
    opt = Adapprox([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=0.1)
    a.grad, b.grad = torch.ones(4, 3), torch.ones(4, 3)
    opt.step()
    assert not torch.equal(a, torch.ones(4, 3))
    assert torch.equal(b, torch.ones(4, 3))


# -- (6) non-matrix parameters ------------------------------------------------------------


def test_vectors_and_scalars_use_the_dense_rule():
    params = _params([(6,), (), (1,)])
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, clip_threshold=1.0)
    ref = DenseAdapproxReference(params, **hyper)
    opt = Adapprox(params, min_rank=1, max_rank=1, rank_tolerance=1.0, **hyper)
    for step in range(10):
        ref.step(_set_grads(params, step))
        opt.step()
        for p, want in zip(params, ref.params, strict=True):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    for p, v in zip(params, ref.second_moments, strict=True):
        assert "factor_q" not in opt.state[p] and "rng_state" not in opt.state[p]
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-12, atol=0)
