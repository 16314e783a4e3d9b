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
    ({"lr": torch.tensor(-1.0)}, "Invalid lr: tensor(-1.) (expected lr > 0)"),
    (
        {"lr": torch.tensor([1.0, 2.0])},
        "Invalid lr: a torch.float32 tensor of shape (2,) "
        "(expected a number or a real 1-element tensor, lr > 0)",
    ),
    (
        {"lr": torch.tensor(True)},
        "Invalid lr: a torch.bool tensor of shape () "
        "(expected a number or a real 1-element tensor, lr > 0)",
    ),
    ({"max_iter": 0}, "Invalid max_iter: 0 (expected an integer >= 1)"),
    ({"max_iter": 2.5}, "Invalid max_iter: 2.5 (expected an integer >= 1)"),
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


# --------------------------------------------------------------------------------------------
# The closure every torch user writes (zero_grad, loss, backward, return the loss), as for
# torch.optim.LBFGS: the gradient comes from p.grad, Newton's second derivatives from
# differences of gradients
# --------------------------------------------------------------------------------------------
BACKWARD_PROBLEMS = ["rosenbrock-2", "quadratic-cond1e4", "logistic-breast-cancer"]
METHODS = {  # minimize's method names
    "newton": (Newton, {"hessian": "exact"}),
    "newton-cg": (Newton, {"hessian": "cg"}),
    "bfgs": (BFGS, {}),
}
SQRT_EPS = {dtype: math.sqrt(torch.finfo(dtype).eps) for dtype in (torch.float32, DTYPE)}


def _backward_closure(opt, loss_fn, grads=None):
    """The standard closure; ``grads`` collects what each call wrote into p.grad."""

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if grads is not None:
            grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
        return loss

    return closure


@pytest.mark.parametrize("name", BACKWARD_PROBLEMS)
@pytest.mark.parametrize("method", list(METHODS))
def test_backward_closure_reaches_the_scipy_minimum(name, method):
    fun_t, x0, fun, jac, hess, gtol = _problem(name)
    if method == "bfgs":
        ref = sopt.minimize(fun, x0, jac=jac, method="BFGS", options={"gtol": gtol})
    else:
        ref = sopt.minimize(fun, x0, jac=jac, hess=hess, method="Newton-CG", options={"xtol": 1e-9})
    assert ref.success, ref.message
    cls, kwargs = METHODS[method]
    x = torch.tensor(x0, requires_grad=True)
    opt = cls([x], max_iter=200 * len(x0), tolerance_grad=gtol, tolerance_change=0.0, **kwargs)
    grads = []
    opt.step(_backward_closure(opt, lambda: fun_t(x), grads))
    state = opt.state[x]
    # The difference Hessian is accurate to ~sqrt(eps) = 1.5e-8 relative, so the Newton
    # direction is a slightly inexact one; the line search still converges to the minimizer,
    # and the stopping test |g|_inf <= gtol puts x within |H^-1| sqrt(n) gtol <= 6e-7 of it
    # (smallest Hessian eigenvalue >= 1 on the quadratic and the logistic loss, 0.4 at
    # Rosenbrock's minimum with gtol 1e-9), as scipy's own solution (xtol 1e-9, gtol).
    # Measured: within 1e-8 of scipy on all nine cases.
    assert state["status"] == StopReason.CONVERGED
    assert state["prev_flat_grad"].abs().max() <= gtol
    np.testing.assert_allclose(x.detach().numpy(), ref.x, rtol=0, atol=1e-6)
    assert abs(state["prev_loss"] - ref.fun) <= 1e-6 * max(1.0, abs(ref.fun))
    # Every closure call is counted, the gradient differences included, and p.grad is what
    # the last call wrote, as torch.optim.LBFGS leaves it.
    assert state["func_evals"] == len(grads)
    assert torch.equal(x.grad, grads[-1][0])
    # The loss-style closure (exact second derivatives) for comparison: differences cost
    # closure calls, not iterations.
    exact = minimize(fun_t, torch.tensor(x0), method, tol=gtol)
    assert exact.success
    assert state["n_iter"] <= exact.nit + 1, (state["n_iter"], exact.nit)
    if method == "newton":
        # n closure calls per difference Hessian
        assert state["hess_evals"] >= state["n_iter"]
        assert state["func_evals"] >= len(x0) * state["hess_evals"] + state["n_iter"] + 1
    elif method == "bfgs":
        # No second derivatives: the same gradients, so the same iterates.
        assert (state["n_iter"], state["func_evals"]) == (exact.nit, exact.nfev)
        torch.testing.assert_close(x.detach(), exact.x, rtol=0, atol=1e-12)


def _analytic_quadratic(n: int = 6, seed: int = 4):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.logspace(0.0, 2.0, n)) @ q.T
    return 0.5 * (a + a.T), rng.standard_normal(n)


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
def test_difference_hessian_matches_analytic_hessians(dtype):
    eps = torch.finfo(dtype).eps
    cases = []
    # A quadratic: no truncation error, only the gradient's rounding, about
    # n eps max|A| max(1, |x|_inf) per component, divided by the step h_i >= sqrt(eps):
    # the error is at most n sqrt(eps) max|A| max(1, |x|_inf) (measured 1e-3 of that).
    a, b = _analytic_quadratic()
    at, bt = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    x_quad = [0.0, -3.0, 0.5, 2.5, -1e-3, 1.0]  # zero, negative and |x_i| > 1 steps
    cases.append((lambda x: 0.5 * x @ at @ x - bt @ x, x_quad, lambda x: a, 6 * 3.0))
    # Rosenbrock against scipy's analytic Hessian: truncation O(h f''') and rounding
    # O(eps / h) are both ~ sqrt(eps) relative; measured 1.4 sqrt(eps) in both dtypes.
    x_rosen = [1.3, -0.7, 0.0, 1.9, 2.5]
    cases.append((_rosen_torch, x_rosen, sopt.rosen_hess, 10.0))
    for fun_t, values, hess, factor in cases:
        x = torch.tensor(values, dtype=dtype, requires_grad=True)
        before = x.detach().clone()
        grads = []

        def closure(fun_t=fun_t, x=x, grads=grads):
            x.grad = None
            loss = fun_t(x)
            loss.backward()
            grads.append(x.grad.clone())
            return loss

        objective = ClosureObjective(closure, [x], "test")
        _, _, g = objective.evaluate()
        ours = objective.hessian(g)
        assert torch.equal(x.detach(), before)  # restored exactly
        assert objective.evals == 1 + len(values) == len(grads)  # one call per column
        assert torch.equal(ours, ours.T)  # symmetrised
        ref = hess(np.array(values, dtype=np.float64))
        err = np.abs(ours.double().numpy() - ref).max() / np.abs(ref).max()
        assert err <= factor * math.sqrt(eps), (err, factor * math.sqrt(eps))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_difference_hessian_vector_product_is_accurate_at_any_scale(scale):
    # The step h = sqrt(eps) max(1, |x|_inf) / |v|_inf makes the move a relative sqrt(eps)
    # whatever |v|: error ~ sqrt(eps) (measured <= 2e-8; asserted <= 10 sqrt(eps) of
    # max|H v|). scipy's approx_fhess_p steps sqrt(eps) v, which here is off by 2e-2
    # (|v| ~ 1e-6: cancellation) and 6e-3 (|v| ~ 1e6: truncation), 7e-9 at |v| ~ 1.
    x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2] * 2)
    x = torch.tensor(x0, requires_grad=True)
    objective = ClosureObjective(
        _backward_closure(torch.optim.SGD([x]), lambda: _rosen_torch(x)), [x], "t"
    )
    _, _, g = objective.evaluate()
    v = torch.tensor(np.random.default_rng(0).standard_normal(10) * scale)
    # g(x) from the last evaluation, which was at x: one closure call, at x + h v
    ours = objective.hessian_vector_product(v).numpy()
    assert torch.equal(x.detach(), torch.tensor(x0))  # restored exactly
    assert objective.evals == 2 and objective.hessian_vector_products == 1
    ref = sopt.rosen_hess_prod(x0, v.numpy())
    assert np.abs(ours - ref).max() <= 10 * SQRT_EPS[DTYPE] * np.abs(ref).max()
    # The last evaluation is now at x + h v: g(x) is passed in, or evaluated again.
    np.testing.assert_array_equal(objective.hessian_vector_product(v, g).numpy(), ours)
    assert objective.evals == 3
    np.testing.assert_array_equal(objective.hessian_vector_product(v).numpy(), ours)
    assert objective.evals == 5 and objective.hessian_vector_products == 3


def test_difference_steps_follow_the_coarsest_parameter_dtype():
    # scipy's rule (_eps_for_method): the relative step is sqrt(eps) of the lowest precision
    # involved. A float64 step (1.5e-8) would vanish when rounded into a float32 parameter
    # near 1 (spacing 1.2e-7); sqrt(eps32) = 3.5e-4 does not.
    a = torch.tensor([1.3, -0.7], dtype=torch.float32, requires_grad=True)
    b = torch.tensor([0.9, 2.5], dtype=DTYPE, requires_grad=True)

    def closure():
        a.grad = b.grad = None
        loss = _rosen_torch(torch.cat([a.double(), b]))
        loss.backward()
        return loss

    objective = ClosureObjective(closure, [a, b], "test")
    assert objective.dtype == DTYPE
    assert objective.relative_step == SQRT_EPS[torch.float32]
    _, _, g = objective.evaluate()
    ours = objective.hessian(g).numpy()
    ref = sopt.rosen_hess(np.array([1.3, -0.7, 0.9, 2.5], dtype=np.float32).astype(np.float64))
    assert np.abs(ours - ref).max() <= 10 * SQRT_EPS[torch.float32] * np.abs(ref).max()


def test_difference_evaluations_are_counted():
    # One iteration on a 5-parameter quadratic, each closure call counted by the closure.
    a, b = _analytic_quadratic(n=5)
    at, bt = torch.tensor(a), torch.tensor(b)
    for method, line_search in [
        ("newton", None),
        ("newton-cg", None),
        ("bfgs", "exact_quadratic"),
    ]:
        cls, kwargs = METHODS[method]
        x = torch.zeros(5, dtype=DTYPE, requires_grad=True)
        opt = cls([x], max_iter=1, tolerance_grad=0.0, line_search=line_search, **kwargs)
        grads = []
        opt.step(_backward_closure(opt, lambda x=x: 0.5 * x @ at @ x - bt @ x, grads))
        state = opt.state[x]
        assert state["n_iter"] == 1 and state["func_evals"] == len(grads)
        if method == "newton":
            # 1 at x, 5 for the difference Hessian (one per column), 1 at the fixed step,
            # which is the Newton step to ~sqrt(eps): the minimizer of the quadratic
            assert (state["func_evals"], state["hess_evals"]) == (7, 1)
            np.testing.assert_allclose(x.detach().numpy(), np.linalg.solve(a, b), atol=1e-6)
        elif method == "newton-cg":
            # 1 at x, one per CG product (at most 5 on an SPD 5 x 5 system), 1 at the step
            assert 1 <= state["hess_evals"] <= 5
            assert state["func_evals"] == 2 + state["hess_evals"]
        else:
            # 1 at x, 1 for the product of the exact_quadratic step, 1 at that step
            assert (state["func_evals"], state["hess_evals"]) == (3, 1)


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("style", ["loss", "backward"])
def test_parameter_without_gradient_path_is_a_zero_gradient(spec, style):
    cls, kwargs = SPECS[spec]
    settings = {"max_iter": 100, "tolerance_grad": 1e-9, "tolerance_change": 0.0, **kwargs}
    w = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
    unused = torch.tensor([0.5, -2.0], dtype=DTYPE, requires_grad=True)  # not in the loss
    frozen = torch.tensor([3.0], dtype=DTYPE)  # requires_grad=False
    alone = w.detach().clone().requires_grad_(True)
    results = []
    for params, x in (([w, unused, frozen], w), ([alone], alone)):
        opt = cls(params, **settings)
        loss_fn = lambda x=x: _rosen_torch(x)  # noqa: E731
        opt.step(loss_fn if style == "loss" else _backward_closure(opt, loss_fn))
        results.append(opt.state[params[0]])
    with_unused, without = results
    assert torch.equal(unused.detach(), torch.tensor([0.5, -2.0], dtype=DTYPE))
    assert torch.equal(frozen, torch.tensor([3.0], dtype=DTYPE))
    # The zero gradient entries change nothing: same iterates as without those parameters.
    # For Newton this needs the zero Hessian rows and columns left out of the Cholesky solve
    # (no shift: last_damping 0 at the minimum).
    assert with_unused["status"] == without["status"] == StopReason.CONVERGED
    assert with_unused["n_iter"] == without["n_iter"]
    torch.testing.assert_close(w.detach(), alone.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.detach(), torch.ones(2, dtype=DTYPE), rtol=0, atol=1e-8)
    assert torch.equal(with_unused["prev_flat_grad"][2:], torch.zeros(3, dtype=DTYPE))
    if spec == "newton":
        assert with_unused["last_damping"] == without["last_damping"] == 0.0
    if style == "backward":
        assert unused.grad is None and frozen.grad is None  # as the closure left them


@pytest.mark.parametrize("spec", list(SPECS))
def test_standard_closure_on_a_module_matches_lbfgs(spec):
    # The same closure for torch.optim.LBFGS and for ours, on a float64 logistic regression
    # (strictly convex with the weight decay): the same minimizer. Tolerance: all stop at
    # |g|_inf <= 1e-9, which bounds the distance to the minimizer by |H^-1| sqrt(31) 1e-9,
    # about 1e-7 here; 1e-6 leaves room for LBFGS's and the differences' own rounding.
    cls, kwargs = SPECS[spec]
    model, inputs, targets = _model_and_data()
    reference = copy.deepcopy(model)
    lbfgs = torch.optim.LBFGS(
        reference.parameters(),
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    lbfgs.step(_backward_closure(lbfgs, _closure(reference, inputs, targets)))
    opt = cls(model.parameters(), max_iter=200, tolerance_grad=1e-9, tolerance_change=0.0, **kwargs)
    opt.step(_backward_closure(opt, _closure(model, inputs, targets)))
    assert opt.state[model.weight]["status"] == StopReason.CONVERGED
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
        assert p.grad is not None  # left by the last closure call, as LBFGS leaves them


@pytest.mark.parametrize("spec", list(SPECS))
def test_loss_style_closure_with_zero_grad_is_differentiated(spec):
    # A closure that calls opt.zero_grad() but no backward() writes no gradient: its loss is
    # differentiated (the same iterates as without zero_grad), and p.grad is what the closure
    # left (None), never written by the optimizer.
    cls, kwargs = SPECS[spec]
    results = []
    for zero_grad in (False, True):
        model, inputs, targets = _model_and_data()
        loss_fn = _closure(model, inputs, targets)
        opt = cls(model.parameters(), max_iter=3, **kwargs)
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)

        def closure(opt=opt, loss_fn=loss_fn, zero_grad=zero_grad):
            if zero_grad:
                opt.zero_grad()
            return loss_fn()

        opt.step(closure)
        assert opt.state[model.weight]["n_iter"] == 3
        assert all((p.grad is None) == zero_grad for p in model.parameters())
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", list(SPECS))
def test_loss_without_gradient_path_reads_p_grad_as_lbfgs(spec):
    # torch.optim.LBFGS reads p.grad whatever the closure does. When the returned loss
    # reaches no parameter and the closure writes no p.grad, so do we; both stay put where
    # that gradient is zero or absent with nothing requiring grad, and move along -p.grad
    # when it was computed before the step.
    cls, kwargs = SPECS[spec]
    settings = {"max_iter": 1, "line_search": None, **kwargs}

    def constant():
        return torch.tensor(2.0)

    other = torch.tensor(2.0, requires_grad=True)

    def elsewhere():  # a graph, but to none of the parameters
        return other.pow(2).div(2.0)

    cases = []
    frozen = [torch.tensor([1.0, -2.0], dtype=DTYPE)]  # requires_grad=False: no .grad ever
    cases.append((frozen, None, constant))
    for closure in (constant, elsewhere):
        zero = [torch.tensor([1.0, -2.0], dtype=DTYPE, requires_grad=True)]
        zero[0].grad = torch.zeros(2, dtype=DTYPE)
        cases.append((zero, torch.zeros(2, dtype=DTYPE), closure))
    for params, grad, closure in cases:
        twins = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
        for t, p in zip(twins, params, strict=True):
            t.grad = None if p.grad is None else p.grad.clone()
        opt, lbfgs = cls(params, **settings), torch.optim.LBFGS(twins, max_iter=1)
        assert opt.step(closure).item() == lbfgs.step(closure).item() == 2.0
        assert torch.equal(params[0].detach(), twins[0].detach())
        assert torch.equal(params[0].detach(), torch.tensor([1.0, -2.0], dtype=DTYPE))
        assert opt.state[params[0]]["status"] == StopReason.CONVERGED
        assert (params[0].grad is None) == (grad is None)  # left as it was
    # A gradient computed outside the closure, which only returns the (detached) loss.
    x = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
    loss = _rosen_torch(x)
    loss.backward()
    g = x.grad.clone()
    opt = cls([x], **settings)
    opt.step(lambda: loss.detach())
    assert torch.equal(x.grad, g)
    if spec == "bfgs":  # the first step is -lr min(1, 1 / |g|) g (H0 = I, no line search)
        expected = torch.tensor([-1.2, 1.0], dtype=DTYPE) - g / g.norm()
        torch.testing.assert_close(x.detach(), expected, rtol=0, atol=1e-15)
    else:  # the gradient does not change with x: zero Hessian, a shifted -g step
        step = x.detach() - torch.tensor([-1.2, 1.0], dtype=DTYPE)
        assert float(step.dot(g)) < 0.0
        torch.testing.assert_close(step / step.norm(), -g / g.norm(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", list(SPECS))
def test_backward_closure_may_zero_grads_in_place(spec):
    # zero_grad(set_to_none=False) + backward() writes p.grad in place (same tensor, new
    # version): still the backward style, with the same iterates as zero_grad().
    cls, kwargs = SPECS[spec]
    results = []
    for set_to_none in (True, False):
        x = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
        opt = cls([x], max_iter=5, **kwargs)

        def closure(x=x, opt=opt, set_to_none=set_to_none):
            opt.zero_grad(set_to_none=set_to_none)
            loss = _rosen_torch(x)
            loss.backward()
            return loss

        opt.step(closure)
        assert opt.state[x]["n_iter"] == 5
        results.append(x.detach())
    assert torch.equal(results[0], results[1])


def test_backward_closure_may_return_a_number():
    # torch.optim.LBFGS takes float(closure()): a closure returning loss.item() works too.
    results = []
    for as_number in (False, True):
        x = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
        opt = Newton([x], max_iter=50, tolerance_grad=1e-10)

        def closure(x=x, opt=opt, as_number=as_number):
            opt.zero_grad()
            loss = _rosen_torch(x)
            loss.backward()
            return loss.item() if as_number else loss

        first = opt.step(closure)
        assert isinstance(first, float) == as_number
        results.append(x.detach())
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], torch.ones(2, dtype=DTYPE), rtol=0, atol=1e-10)


def _closure_errors(x, other):
    def backward_then(result, loss_fn):
        def closure():
            x.grad = other.grad = None
            loss = loss_fn()
            loss.backward()
            return result(loss)

        return closure

    no_path = "{}: the loss returned by the closure does not depend on any of the optimizer's "
    no_path += "parameters"
    has = ", and no parameter has a .grad"
    return [
        (lambda: None, "{}: the closure returned None (expected the loss)"),
        (
            lambda: _rosen_torch(x).item(),
            "{}: the closure returned a float, not a tensor, and no parameter has a .grad: "
            "return the loss tensor computed from the parameters (the optimizer "
            "differentiates it), or compute the gradient in the closure (loss.backward()) as "
            "for torch.optim.LBFGS",
        ),
        (
            lambda: _rosen_torch(x).detach(),
            no_path + " (it does not require grad: computed under torch.no_grad(), or from "
            "detached tensors?), and no parameter has a .grad",
        ),
        # a graph that reaches other tensors but none of the parameters, in both styles
        (lambda: (other**2).sum(), no_path + " (none of them has a gradient path to it)" + has),
        (
            backward_then(lambda loss: loss, lambda: (other**2).sum()),
            no_path + " (none of them has a gradient path to it)" + has,
        ),
        (
            lambda: x**2,
            "{}: the closure returned a tensor of shape (2,) (expected the loss, a tensor with "
            "one element)",
        ),
        (
            backward_then(lambda loss: (loss,), lambda: _rosen_torch(x)),
            "{}: the closure returned a tuple (expected the loss: a tensor with one element or "
            "a Python number)",
        ),
    ]


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("case", range(7))
def test_closure_errors_say_what_is_wrong(spec, case):
    cls, kwargs = SPECS[spec]
    x = torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True)
    other = torch.ones(2, dtype=DTYPE, requires_grad=True)
    closure, message = _closure_errors(x, other)[case]
    opt = cls([x], **kwargs)
    with pytest.raises(RuntimeError) as info:
        opt.step(closure)
    assert str(info.value) == message.format(cls.__name__)
    if "gradient path" in message or "require grad" in message:
        assert "backward" not in str(info.value)  # not blamed for a missing gradient path
    assert torch.equal(x.detach(), torch.tensor([-1.2, 1.0], dtype=DTYPE))


@pytest.mark.parametrize("spec", list(SPECS))
def test_tensor_lr_is_read_once_per_step(spec):
    cls, kwargs = SPECS[spec]
    # line_search=None: the step is lr itself, so a wrong lr shows in the iterates
    settings = {"max_iter": 2, "line_search": None, **kwargs}
    lr = torch.tensor(0.5, dtype=DTYPE)
    xs = [torch.tensor([-1.2, 1.0], dtype=DTYPE, requires_grad=True) for _ in range(3)]
    tensor_opt = cls([xs[0]], lr=lr, **settings)
    float_opt = cls([xs[1]], lr=0.5, **settings)
    kept_opt = cls([xs[2]], lr=0.5, **settings)
    for opt, x in zip((tensor_opt, float_opt, kept_opt), xs, strict=True):
        opt.step(lambda x=x: _rosen_torch(x))
    assert torch.equal(xs[0], xs[1]) and torch.equal(xs[0], xs[2])
    # Changed in place (as a scheduler does): used from the next step on.
    lr.fill_(0.25)
    float_opt.param_groups[0]["lr"] = 0.25
    for opt, x in zip((tensor_opt, float_opt, kept_opt), xs, strict=True):
        opt.step(lambda x=x: _rosen_torch(x))
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[0], xs[2])
    assert tensor_opt.param_groups[0]["lr"] is lr
    buffer = io.BytesIO()
    torch.save(tensor_opt.state_dict(), buffer)
    buffer.seek(0)
    twin = cls([xs[0].detach().clone().requires_grad_(True)], lr=1.0, **settings)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(twin.param_groups[0]["lr"]) == 0.25


@pytest.mark.parametrize("module", ["newton", "bfgs", "minimize"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"microadam.optim.{module}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(mod, module, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
