"""Newton, BFGS, the strong-Wolfe line search and ``minimize``, checked against scipy.optimize.

scipy gets independent NumPy implementations of each function, gradient and Hessian; ours get
torch functions differentiated by autograd. Everything is float64.
"""

from __future__ import annotations

import copy
import io
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import optimize as sopt
from sklearn.datasets import load_breast_cancer

from microadam.optim.bfgs import BFGS
from microadam.optim.line_search import (
    C1,
    C2,
    ClosureObjective,
    StopReason,
    cubic_minimizer,
    strong_wolfe,
)
from microadam.optim.minimize import OptimizeResult, minimize
from microadam.optim.newton import DEFAULT_MAX_HESSIAN_SIZE, Newton

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------
# Problems: (torch function, x0, scipy fun, scipy jac, scipy hess, gtol for BFGS and ours)
# --------------------------------------------------------------------------------------------
def _rosen_torch(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def _quadratic(n: int = 20, cond: float = 1e4, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.logspace(0.0, math.log10(cond), n)) @ q.T
    a = 0.5 * (a + a.T)
    b = rng.standard_normal(n)
    return a, b


def _logistic_data():
    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    features = np.hstack([features, np.ones((features.shape[0], 1))])  # intercept column
    return features, 2.0 * labels - 1.0  # labels in {-1, +1}


def _problem(name: str):
    if name == "rosenbrock-2":
        x0 = np.array([-1.2, 1.0])
        return _rosen_torch, x0, sopt.rosen, sopt.rosen_der, sopt.rosen_hess, 1e-9
    if name == "rosenbrock-10":
        x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2] * 2)
        return _rosen_torch, x0, sopt.rosen, sopt.rosen_der, sopt.rosen_hess, 1e-9
    if name == "quadratic-cond1e4":
        a, b = _quadratic()
        at, bt = torch.tensor(a), torch.tensor(b)

        def fun_t(x):
            return 0.5 * x @ at @ x - bt @ x

        # gtol 1e-7: scipy's BFGS stops on precision loss below that (||A|| = 1e4).
        return (
            fun_t,
            np.zeros(len(b)),
            lambda x: 0.5 * x @ a @ x - b @ x,
            lambda x: a @ x - b,
            lambda x: a,
            1e-7,
        )
    if name == "logistic-breast-cancer":
        # Summed log-loss + (lam / 2) ||w||^2 with lam = 1 (1.8e-3 per sample): strictly
        # convex, Hessian condition number ~ 3e4 at the minimum.
        features, labels = _logistic_data()
        lam = 1.0
        xt, yt = torch.tensor(features), torch.tensor(labels)

        def fun_t(w):
            return torch.nn.functional.softplus(-yt * (xt @ w)).sum() + 0.5 * lam * (w @ w)

        def fun(w):
            return np.logaddexp(0.0, -labels * (features @ w)).sum() + 0.5 * lam * w @ w

        def jac(w):
            sig = 1.0 / (1.0 + np.exp(labels * (features @ w)))
            return -(features.T @ (labels * sig)) + lam * w

        def hess(w):
            p = 1.0 / (1.0 + np.exp(-(features @ w)))
            return (features.T * (p * (1.0 - p))) @ features + lam * np.eye(features.shape[1])

        return fun_t, np.zeros(features.shape[1]), fun, jac, hess, 1e-7
    raise KeyError(name)


PROBLEMS = ["rosenbrock-2", "rosenbrock-10", "quadratic-cond1e4", "logistic-breast-cancer"]


def _assert_same_solution(ours: OptimizeResult, ref) -> None:
    assert ours.success, ours.message
    assert ref.success, ref.message
    assert ours.message == "Optimization terminated successfully."
    np.testing.assert_allclose(ours.x.numpy(), ref.x, rtol=0, atol=1e-6)
    assert abs(ours.fun - ref.fun) <= 1e-6 * max(1.0, abs(ref.fun))


@pytest.mark.parametrize("name", PROBLEMS)
def test_bfgs_matches_scipy(name):
    fun_t, x0, fun, jac, _, gtol = _problem(name)
    ref = sopt.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": gtol})
    ours = minimize(fun_t, x0, "bfgs", tol=gtol)
    _assert_same_solution(ours, ref)
    # No slack: with H0 = I and N&W eq. 3.60 for the first trial step (both as scipy) the
    # counts are within a couple of iterations of scipy's on all four problems.
    assert ours.nit <= 1.5 * ref.nit, (ours.nit, ref.nit)
    assert ours.nfev == ours.njev
    assert ours.grad.abs().max() <= gtol


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("method", ["newton", "newton-cg"])
def test_newton_matches_scipy_newton_cg(name, method):
    fun_t, x0, fun, jac, hess, gtol = _problem(name)
    # scipy's Newton-CG stops on the step size; 1e-9 makes its solution accurate to ~1e-9
    # (scipy 1.17 reports precision loss on the quadratic at 1e-10, at the same solution).
    ref = sopt.minimize(fun, x0, jac=jac, hess=hess, method="Newton-CG", options={"xtol": 1e-9})
    # The logistic loss, summed over 569 samples, has a float64 gradient floor near 2e-8
    # (seen with numpy 2.4 and scikit-learn 1.9: the line search then reports precision
    # loss at the same solution), so it is asked for its own gtol of 1e-7.
    tol = gtol if name == "logistic-breast-cancer" else min(gtol, 1e-8)
    ours = minimize(fun_t, torch.tensor(x0), method, tol=tol)
    _assert_same_solution(ours, ref)
    assert ours.nit <= 1.5 * ref.nit, (ours.nit, ref.nit)
    assert ours.nhev >= 1


def test_bfgs_initial_scaling_reaches_the_same_minimizer():
    fun_t, x0, fun, jac, _, gtol = _problem("rosenbrock-10")
    ref = sopt.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": gtol})
    ours = minimize(fun_t, x0, "bfgs", tol=gtol, initial_scaling=True)
    _assert_same_solution(ours, ref)
    assert ours.nit <= 1.5 * ref.nit, (ours.nit, ref.nit)


# --------------------------------------------------------------------------------------------
# Textbook properties on quadratics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line_search", [None, "strong_wolfe", "exact_quadratic"])
def test_newton_solves_a_convex_quadratic_in_one_iteration(line_search):
    a, b = _quadratic(n=15, cond=1e3, seed=3)
    at, bt = torch.tensor(a), torch.tensor(b)
    x = torch.zeros(15, dtype=DTYPE, requires_grad=True)
    opt = Newton([x], max_iter=1, line_search=line_search, tolerance_grad=0.0)
    opt.step(lambda: 0.5 * x @ at @ x - bt @ x)
    state = opt.state[x]
    assert state["n_iter"] == 1
    assert state["last_damping"] == 0.0
    assert state["prev_flat_grad"].abs().max() <= 1e-10
    np.testing.assert_allclose(x.detach().numpy(), np.linalg.solve(a, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "cond"), [(10, 1e2), (20, 1e4)])
def test_bfgs_with_exact_line_search_ends_within_n_iterations(n, cond):
    # N&W Thm. 6.4 (finite termination): with exact line searches on a strictly convex
    # quadratic, BFGS directions are A-conjugate, so at most n iterations.
    a, b = _quadratic(n=n, cond=cond, seed=1)
    at, bt = torch.tensor(a), torch.tensor(b)
    res = minimize(
        lambda x: 0.5 * x @ at @ x - bt @ x,
        torch.zeros(n, dtype=DTYPE),
        "bfgs",
        tol=1e-8,
        line_search="exact_quadratic",
    )
    assert res.success
    assert res.nit <= n
    np.testing.assert_allclose(res.x.numpy(), np.linalg.solve(a, b), rtol=0, atol=1e-10)


def test_newton_damping_grows_when_the_hessian_is_indefinite():
    x = torch.tensor([0.1, 1.0], dtype=DTYPE, requires_grad=True)

    def closure():  # f'' = 12 x0^2 - 2 < 0 at x0 = 0.1: the pure Newton step goes uphill
        return x[0] ** 4 - x[0] ** 2 + x[1] ** 2

    f0 = closure().item()
    opt = Newton([x], max_iter=1)
    opt.step(closure)
    assert opt.state[x]["last_damping"] > 0.0
    assert closure().item() < f0
    opt = Newton([x], max_iter=50, tolerance_grad=1e-12)
    opt.step(closure)
    np.testing.assert_allclose(x.detach().numpy(), [1 / math.sqrt(2), 0.0], atol=1e-10)


def test_newton_cg_handles_negative_curvature():
    x = torch.tensor([0.1, 1.0], dtype=DTYPE, requires_grad=True)

    def closure():
        return x[0] ** 4 - x[0] ** 2 + x[1] ** 2

    opt = Newton([x], hessian="cg", max_iter=50, tolerance_grad=1e-12, tolerance_change=0.0)
    opt.step(closure)
    assert opt.state[x]["status"] == StopReason.CONVERGED
    np.testing.assert_allclose(x.detach().numpy(), [1 / math.sqrt(2), 0.0], atol=1e-10)


# --------------------------------------------------------------------------------------------
# Line search
# --------------------------------------------------------------------------------------------
def test_cubic_minimizer_is_exact_on_a_cubic():
    def f(t):
        return (t - 1.0) ** 3 - 3.0 * (t - 1.0)  # local minimizer at t = 2

    def df(t):
        return 3.0 * (t - 1.0) ** 2 - 3.0

    assert cubic_minimizer(0.5, f(0.5), df(0.5), 3.0, f(3.0), df(3.0)) == pytest.approx(2.0)
    assert cubic_minimizer(3.0, f(3.0), df(3.0), 0.5, f(0.5), df(0.5)) == pytest.approx(2.0)
    assert math.isnan(cubic_minimizer(1.0, 0.0, 1.0, 1.0, 0.0, 1.0))


@pytest.mark.parametrize("alpha_init", [1e-4, 1.0, 50.0])
def test_strong_wolfe_conditions_hold(alpha_init):
    # phi(alpha) = f(x + alpha d) for Rosenbrock along the steepest-descent direction.
    x = torch.tensor([-1.2, 1.0], dtype=DTYPE)

    def value_and_grad(z):
        z = z.clone().requires_grad_(True)
        f = _rosen_torch(z)
        (g,) = torch.autograd.grad(f, z)
        return f.item(), g

    f0, g0 = value_and_grad(x)
    d = -g0 / g0.norm()

    def phi(alpha):
        f, g = value_and_grad(x + alpha * d)
        return f, float(g @ d), g

    dphi0 = float(g0 @ d)
    res = strong_wolfe(phi, f0, dphi0, g0, alpha_init)
    assert res.success
    assert res.loss <= f0 + C1 * res.alpha * dphi0
    assert abs(res.derivative) <= C2 * abs(dphi0)
    assert res.evals <= 25


def test_strong_wolfe_rejects_ascent_directions():
    with pytest.raises(ValueError, match=r"Invalid dphi0: 1.0 \(expected a descent direction"):
        strong_wolfe(lambda a: (0.0, 0.0, torch.zeros(1)), 0.0, 1.0, torch.zeros(1))


def test_dense_hessian_matches_torch_functional_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(
        DTYPE
    )
    inputs = torch.randn(16, 3, dtype=DTYPE)
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def loss_of(*flat_params):
        out = torch.func.functional_call(
            model,
            dict(zip([n for n, _ in model.named_parameters()], flat_params, strict=True)),
            (inputs,),
        )
        return (out**2).mean()

    objective = ClosureObjective(lambda: (model(inputs) ** 2).mean(), params, "test")
    objective.evaluate(create_graph=True)
    ours = objective.hessian(chunk_size=7)  # several chunks, one partial
    blocks = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in params))
    sizes = [math.prod(s) for s in shapes]
    ref = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
            for i in range(len(params))
        ]
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(ref.shape[0], dtype=DTYPE)
    torch.testing.assert_close(objective.hessian_vector_product(v), ref @ v)


# --------------------------------------------------------------------------------------------
# minimize front end
# --------------------------------------------------------------------------------------------
def test_minimize_reports_max_iter_in_scipy_words():
    ref = sopt.minimize(
        sopt.rosen, [-1.2, 1.0], jac=sopt.rosen_der, method="BFGS", options={"maxiter": 5}
    )
    res = minimize(_rosen_torch, np.array([-1.2, 1.0]), "BFGS", max_iter=5)
    assert (res.success, res.status, res.nit) == (False, 1, 5)
    assert res.message == ref.message == "Maximum number of iterations has been exceeded."
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == DTYPE


def test_minimize_reports_nan():
    res = minimize(lambda x: (x**2).sum() * float("nan"), torch.ones(3, dtype=DTYPE))
    assert (res.success, res.status, res.message) == (False, 3, "NaN result encountered.")


def test_minimize_reports_precision_loss():
    # A gradient tolerance below what float64 can resolve: scipy and we give up the same way.
    fun_t, x0, fun, jac, _, _ = _problem("quadratic-cond1e4")
    ref = sopt.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": 1e-14})
    res = minimize(fun_t, x0, "bfgs", tol=1e-14)
    message = "Desired error not necessarily achieved due to precision loss."
    assert ref.message == message
    assert (res.success, res.status, res.message) == (False, 2, message)
    np.testing.assert_allclose(res.x.numpy(), ref.x, atol=1e-6)


def test_minimize_keeps_shape_and_accepts_integers():
    res = minimize(lambda x: ((x - 3.0) ** 2).sum(), np.zeros((2, 2), dtype=np.int64), "newton")
    assert res.x.shape == (2, 2) and res.x.dtype == DTYPE and res.grad.shape == (2, 2)
    assert res.nit == 1 and res.success
    torch.testing.assert_close(res.x, torch.full((2, 2), 3.0, dtype=DTYPE))


def test_minimize_turns_lists_into_float64_and_validates_tol():
    res = minimize(lambda x: ((x - 3.0) ** 2).sum(), [0.0, 1.0], "newton-cg")
    assert res.x.dtype == DTYPE and res.success
    res32 = minimize(lambda x: ((x - 3.0) ** 2).sum(), torch.zeros(2), "bfgs")
    assert res32.x.dtype == torch.float32 and res32.success
    with pytest.raises(ValueError, match=r"^Invalid tol: -1.0 \(expected tol >= 0\)$"):
        minimize(_rosen_torch, [0.0, 0.0], tol=-1.0)


def test_minimize_rejects_unknown_method():
    with pytest.raises(
        ValueError,
        match=r"^Invalid method: 'lbfgs' \(expected one of 'bfgs', 'newton', 'newton-cg'\)$",
    ):
        minimize(_rosen_torch, np.zeros(2), "lbfgs")


# --------------------------------------------------------------------------------------------
# The optimizer classes on a small torch model through the closure API
# --------------------------------------------------------------------------------------------
def _model_and_data(dtype=DTYPE, seed=0, in_features=30):
    torch.manual_seed(seed)
    features, labels = _logistic_data()
    inputs = torch.tensor(features[:, :in_features], dtype=dtype)
    targets = torch.tensor((labels + 1) / 2, dtype=dtype)
    model = torch.nn.Linear(in_features, 1).to(dtype)
    return model, inputs, targets


def _closure(model, inputs, targets, weight_decay=1e-2):
    def closure():
        logits = model(inputs).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return loss + 0.5 * weight_decay * model.weight.pow(2).sum()

    return closure


SPECS = {
    "bfgs": (BFGS, {}),
    "newton": (Newton, {}),
    "newton-cg": (Newton, {"hessian": "cg"}),
}


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_decreases_on_linear_logistic_regression(spec, dtype):
    cls, kwargs = SPECS[spec]
    model, inputs, targets = _model_and_data(dtype)
    closure = _closure(model, inputs, targets)
    opt = cls(model.parameters(), max_iter=5, **kwargs)
    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and not first.requires_grad
    losses = [first.item()]
    for _ in range(3):
        losses.append(opt.step(closure).item())
    # Non-increasing: Newton may reach the minimizer (to tolerance) within the first step.
    assert all(b <= a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("spec", list(SPECS))
def test_closure_is_required(spec):
    cls, kwargs = SPECS[spec]
    model, _, _ = _model_and_data()
    opt = cls(model.parameters(), **kwargs)
    name = cls.__name__
    with pytest.raises(RuntimeError, match=rf"^{name} requires a closure that re-evaluates"):
        opt.step()


@pytest.mark.parametrize("spec", list(SPECS))
def test_step_does_not_touch_p_grad(spec):
    cls, kwargs = SPECS[spec]
    model, inputs, targets = _model_and_data()
    sentinels = []
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
        sentinels.append((p.grad, p.grad.clone()))
    opt = cls(model.parameters(), max_iter=3, **kwargs)
    opt.step(_closure(model, inputs, targets))
    for p, (grad, value) in zip(model.parameters(), sentinels, strict=True):
        assert p.grad is grad
        assert torch.equal(p.grad, value)


def test_bfgs_accepts_lbfgs_style_closures():
    results = []
    for call_backward in (False, True):
        model, inputs, targets = _model_and_data()
        loss_fn = _closure(model, inputs, targets)
        opt = BFGS(model.parameters(), max_iter=10)

        def closure(loss_fn=loss_fn, opt=opt, call_backward=call_backward):
            opt.zero_grad()
            loss = loss_fn()
            if call_backward:
                loss.backward()
            return loss

        opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_newton_explains_lbfgs_style_closures():
    model, inputs, targets = _model_and_data()
    loss_fn = _closure(model, inputs, targets)

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    opt = Newton(model.parameters())
    with pytest.raises(RuntimeError, match=r"without calling loss\.backward\(\)"):
        opt.step(closure)


@pytest.mark.parametrize("spec", list(SPECS))
def test_state_dict_round_trip_with_weights_only(spec):
    cls, kwargs = SPECS[spec]
    model, inputs, targets = _model_and_data()
    opt = cls(model.parameters(), max_iter=2, **kwargs)
    closure = _closure(model, inputs, targets)
    for _ in range(3):
        opt.step(closure)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = copy.deepcopy(model)
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2.parameters(), max_iter=2, **kwargs)
    opt2.load_state_dict(saved["optimizer"])
    if spec == "bfgs":
        assert "inverse_hessian" in opt2.state[next(iter(model2.parameters()))]

    closure2 = _closure(model2, inputs, targets)
    for _ in range(3):
        assert torch.equal(opt.step(closure), opt2.step(closure2))
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert s1.keys() == s2.keys()
    for key, value in s1.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, s2[key]), key
        else:
            assert value == s2[key], key


def test_exact_newton_refuses_large_models_and_cg_takes_them():
    model, _, _ = _model_and_data(in_features=30)
    big = torch.nn.Linear(100, 60).to(DTYPE)  # 6060 parameters
    expected = (
        r"^Newton\(hessian='exact'\) forms a dense 6060 x 6060 Hessian \(6060 parameters > "
        r"max_hessian_size=5000; .*\): use hessian='cg' \(Hessian-free Newton-CG\), "
        r"or raise max_hessian_size$"
    )
    assert DEFAULT_MAX_HESSIAN_SIZE == 5000
    with pytest.raises(ValueError, match=expected):
        Newton(big.parameters())
    with pytest.raises(ValueError, match=r"31 parameters > max_hessian_size=30"):
        Newton(model.parameters(), max_hessian_size=30)
    opt = Newton(big.parameters(), hessian="cg", max_iter=2)
    x = torch.randn(8, 100, dtype=DTYPE)
    before = big(x).pow(2).mean().item()
    opt.step(lambda: big(x).pow(2).mean())
    assert big(x).pow(2).mean().item() < before


def test_only_one_param_group():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    for cls in (BFGS, Newton):
        with pytest.raises(
            ValueError,
            match=rf"^{cls.__name__} doesn't support per-parameter options \(parameter groups\)",
        ):
            cls([{"params": [a]}, {"params": [b], "lr": 0.5}])


COMMON_INVALID = [
    ({"lr": 0.0}, "Invalid lr: 0.0 (expected lr > 0)"),
    ({"lr": -1.0}, "Invalid lr: -1.0 (expected lr > 0)"),
    ({"max_iter": 0}, "Invalid max_iter: 0 (expected max_iter >= 1)"),
    ({"max_iter": 2.5}, "Invalid max_iter: 2.5 (expected max_iter >= 1)"),
    ({"tolerance_grad": -1e-3}, "Invalid tolerance_grad: -0.001 (expected tolerance_grad >= 0)"),
    (
        {"tolerance_change": float("nan")},
        "Invalid tolerance_change: nan (expected tolerance_change >= 0)",
    ),
    (
        {"line_search": "armijo"},
        "Invalid line_search: 'armijo' (expected 'strong_wolfe', 'exact_quadratic' or None)",
    ),
]
NEWTON_INVALID = [
    ({"hessian": "bfgs"}, "Invalid hessian: 'bfgs' (expected 'exact' or 'cg')"),
    ({"damping": -0.1}, "Invalid damping: -0.1 (expected damping >= 0)"),
    ({"max_hessian_size": 0}, "Invalid max_hessian_size: 0 (expected max_hessian_size >= 1)"),
    ({"cg_max_iter": 0}, "Invalid cg_max_iter: 0 (expected None or cg_max_iter >= 1)"),
]
BFGS_INVALID = [
    ({"initial_scaling": 1}, "Invalid initial_scaling: 1 (expected True or False)"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [(BFGS, k, m) for k, m in COMMON_INVALID + BFGS_INVALID]
    + [(Newton, k, m) for k, m in COMMON_INVALID + NEWTON_INVALID],
)
def test_invalid_hyperparameters(cls, kwargs, message):
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError) as info:
        cls([x], **kwargs)
    assert str(info.value) == message
