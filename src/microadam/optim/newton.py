"""Newton's method: exact Hessian with modified Cholesky, or Hessian-free Newton-CG.

The class is thin (validation, ``defaults``, global state in the first parameter's state);
the directions are :func:`newton_direction` (dense) and :func:`newton_cg_direction`
(Hessian-vector products only), and the step length and iteration loop are shared with BFGS
in :mod:`microadam.optim.line_search`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from microadam.optim._common import check_nonnegative
from microadam.optim.line_search import (
    ClosureObjective,
    check_single_group,
    run_line_search_method,
    validate_line_search_hyperparameters,
)

__all__ = [
    "DEFAULT_MAX_HESSIAN_SIZE",
    "HESSIANS",
    "Newton",
    "newton_cg_direction",
    "newton_direction",
]

# Largest parameter count for hessian="exact": the dense Hessian and its Cholesky factor are
# 2 n^2 elements (400 MB in float64 at n = 5000), forming it costs n Hessian-vector products
# and factoring it n^3 / 3 flops (about 4e10, seconds on a CPU core).
DEFAULT_MAX_HESSIAN_SIZE = 5000
HESSIANS = ("exact", "cg")
# N&W Alg. 3.3 (Cholesky with added multiple of the identity): first shift beta, relative to
# the Hessian's scale here so that the rule does not depend on the units of f.
_SHIFT_BETA = 1e-3
# Doubling the shift 64 times from beta covers any finite Hessian.
_MAX_SHIFT_DOUBLINGS = 64


def newton_direction(hessian: Tensor, g: Tensor, damping: float) -> tuple[Tensor | None, float]:
    """Solve :math:`(\\nabla^2 f + \\tau I) p = -g`, raising the shift :math:`\\tau` until SPD.

    :math:`\\tau` starts at ``damping`` and, when Cholesky fails (the shifted Hessian is not
    positive definite), grows as in N&W Alg. 3.3: to :math:`-\\min_i h_{ii} + \\beta` if the
    diagonal is not positive, then doubling, with :math:`\\beta = 10^{-3} \\max_i |h_{ii}|`.

    Coordinates whose Hessian row (and so column) and gradient are exactly zero, such as
    parameters with no gradient path to the loss, are left out of the system and get
    :math:`p_i = 0`: kept in, they would make the Hessian singular and force the shift on
    every other coordinate (damped, only linearly convergent steps).

    ``hessian`` is overwritten (its diagonal is shifted in place). Returns ``(p, tau)``;
    ``p`` is ``None`` when no shift works (non-finite Hessian).
    """
    active = hessian.ne(0).any(dim=1).logical_or_(g.ne(0))
    if not bool(active.all()):
        p = torch.zeros_like(g)
        if not bool(active.any()):
            return p, damping
        index = active.nonzero().squeeze(1)
        sub, tau = newton_direction(hessian[index][:, index], g[index], damping)
        if sub is None:
            return None, tau
        p[index] = sub
        return p, tau
    diag = hessian.diagonal()  # a view: writing it shifts the Hessian
    scale = float(diag.abs().max()) if diag.numel() else 0.0
    beta = _SHIFT_BETA * scale if scale > 0.0 and math.isfinite(scale) else _SHIFT_BETA
    tau = damping
    min_diag = float(diag.min())
    if not min_diag + tau > 0.0:
        tau = max(tau, -min_diag + beta)
    applied = 0.0  # shift currently on the diagonal: shifting in place keeps memory at 2 n^2
    for _ in range(_MAX_SHIFT_DOUBLINGS):
        if tau != applied:
            diag.add_(tau - applied)
            applied = tau
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) == 0:
            p = torch.cholesky_solve(g.unsqueeze(1), factor).squeeze(1).neg_()
            return p, tau
        tau = max(2.0 * tau, beta)
    return None, tau


def newton_cg_direction(
    hvp: Callable[[Tensor], Tensor], g: Tensor, damping: float, max_iter: int
) -> Tensor:
    """Truncated conjugate gradient on :math:`(\\nabla^2 f + \\tau I) p = -g` (N&W Alg. 7.1).

    CG stops when the residual is below :math:`\\eta \\|g\\|` with the forcing term
    :math:`\\eta = \\min(0.5, \\sqrt{\\|g\\|})` (superlinear convergence, N&W Thm. 7.2), after
    ``max_iter`` products, or at the first direction of non-positive curvature: the iterate
    so far is returned, or :math:`-g` if that happens on the first CG iteration, so the result
    is always a descent direction.
    """
    g_norm = float(g.norm())
    tolerance = min(0.5, math.sqrt(g_norm)) * g_norm
    z = torch.zeros_like(g)
    r = g.clone()  # residual of B z = -g at z = 0
    p = g.neg()
    rr = float(r.dot(r))
    for j in range(max_iter):
        bp = hvp(p)
        if damping:
            bp.add_(p, alpha=damping)
        curvature = float(p.dot(bp))
        if not curvature > 0.0:
            return g.neg() if j == 0 else z
        alpha = rr / curvature
        z.add_(p, alpha=alpha)
        r.add_(bp, alpha=alpha)
        rr_new = float(r.dot(r))
        if math.sqrt(rr_new) < tolerance:
            break
        p.mul_(rr_new / rr).sub_(r)
        rr = rr_new
    return z


def _check_hessian_size(n: int, limit: int, error: type[Exception]) -> None:
    if n > limit:
        gigabytes = 2 * n * n * 8 / 1e9
        raise error(
            f"Newton(hessian='exact') forms a dense {n} x {n} Hessian ({n} parameters > "
            f"max_hessian_size={limit}; about {gigabytes:.1f} GB in float64 with its Cholesky "
            "factor): use hessian='cg' (Hessian-free Newton-CG), or raise max_hessian_size"
        )


class Newton(Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        max_iter: int = 20,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        line_search: str | None = "strong_wolfe",
        hessian: str = "exact",
        damping: float = 0.0,
        max_hessian_size: int = DEFAULT_MAX_HESSIAN_SIZE,
        cg_max_iter: int | None = None,
    ) -> None:
        validate_line_search_hyperparameters(
            lr, max_iter, tolerance_grad, tolerance_change, line_search
        )
        if hessian not in HESSIANS:
            raise ValueError(f"Invalid hessian: {hessian!r} (expected 'exact' or 'cg')")
        check_nonnegative("damping", damping)
        if (
            isinstance(max_hessian_size, bool)
            or not isinstance(max_hessian_size, int)
            or max_hessian_size < 1
        ):
            raise ValueError(
                f"Invalid max_hessian_size: {max_hessian_size!r} (expected max_hessian_size >= 1)"
            )
        if cg_max_iter is not None and (
            isinstance(cg_max_iter, bool) or not isinstance(cg_max_iter, int) or cg_max_iter < 1
        ):
            raise ValueError(
                f"Invalid cg_max_iter: {cg_max_iter!r} (expected None or cg_max_iter >= 1)"
            )
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "line_search": line_search,
            "hessian": hessian,
            "damping": damping,
            "max_hessian_size": max_hessian_size,
            "cg_max_iter": cg_max_iter,
        }
        super().__init__(params, defaults)
        check_single_group(self, "Newton")
        if hessian == "exact":
            n = sum(p.numel() for p in self.param_groups[0]["params"])
            _check_hessian_size(n, max_hessian_size, ValueError)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` Newton iterations.

        Args:
            closure (Callable): re-evaluates the model and returns the loss (required):
                either the loss tensor with its graph, without calling ``backward()`` (exact
                second derivatives from autograd), or, as for :class:`torch.optim.LBFGS`,
                after ``zero_grad()`` and ``loss.backward()`` (second derivatives from
                differences of gradients).

        Returns:
            The loss returned by the first call of the closure, detached.
        """
        if closure is None:
            raise RuntimeError(
                "Newton requires a closure that re-evaluates the model and returns the loss: "
                "optimizer.step(closure)"
            )
        # add_param_group() may have run since __init__.
        check_single_group(self, "Newton", RuntimeError)
        group = self.param_groups[0]
        params = group["params"]
        state = self.state[params[0]]  # only global state, as in torch.optim.LBFGS
        objective = ClosureObjective(closure, params, "Newton")
        damping = float(group["damping"])
        if group["hessian"] == "exact":
            # Checked again here: param_groups may have been edited or loaded since __init__.
            _check_hessian_size(objective.numel, group["max_hessian_size"], RuntimeError)

            def direction(g: Tensor) -> Tensor | None:
                hess = objective.hessian(g)
                state["hess_evals"] = state.get("hess_evals", 0) + 1
                p, tau = newton_direction(hess, g, damping)
                state["last_damping"] = tau
                return p

        else:
            cg_max_iter = group["cg_max_iter"] or 20 * objective.numel  # scipy's default

            def direction(g: Tensor) -> Tensor | None:
                state["last_damping"] = damping
                return newton_cg_direction(
                    lambda v: objective.hessian_vector_product(v, g), g, damping, cg_max_iter
                )

        return run_line_search_method(objective, state, group, direction, create_graph=True)


Newton.__doc__ = r"""Implements Newton's method, with an exact or a Hessian-free (CG) Newton step.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{input}: \gamma \text{ (lr)}, \: \theta_0 \text{ (params)},
                \: f(\theta) \text{ (closure)}, \: \lambda \text{ (damping)},            \\
            &\hspace{13mm} \tau_g \text{ (tolerance\_grad)},
                \: \tau_c \text{ (tolerance\_change)}                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{for} \: k=0 \: \textbf{to} \: \textit{max\_iter}-1 \: \textbf{do}     \\
            &\hspace{5mm} g_k \leftarrow \nabla f(\theta_k); \:
                \textbf{if} \: \|g_k\|_\infty \le \tau_g \: \textbf{break}                 \\
            &\hspace{5mm} \textbf{if} \: \textit{hessian} = \text{exact}:                 \\
            &\hspace{10mm} B_k \leftarrow \nabla^2 f(\theta_k)                            \\
            &\hspace{10mm} \mu \leftarrow \lambda; \: \textbf{while} \:
                B_k + \mu I \not\succ 0: \: \mu \leftarrow \max(2\mu, \beta)
                \quad \text{(Cholesky fails)}                                             \\
            &\hspace{10mm} p_k \leftarrow -(B_k + \mu I)^{-1} g_k                         \\
            &\hspace{5mm} \textbf{else}: p_k \leftarrow \text{truncated CG on }
                (\nabla^2 f(\theta_k) + \lambda I) p = -g_k \text{, products only}         \\
            &\hspace{5mm} \alpha_k \leftarrow \text{strong-Wolfe search from }
                \alpha = \gamma \min\big(1, 2.02 \, \tfrac{f_k - f_{k-1}}{g_k^\top p_k}\big)
                \: (\alpha = \gamma \text{ at } k = 0)                                    \\
            &\hspace{5mm} \theta_{k+1} \leftarrow \theta_k + \alpha_k p_k                  \\
            &\hspace{5mm} \textbf{if} \: \|\alpha_k p_k\|_\infty \le \tau_c \: \textbf{or} \:
                |f(\theta_{k+1}) - f(\theta_k)| < \tau_c \: \textbf{break}                 \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \: \theta_k                                                      \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    For the details see Nocedal & Wright, "Numerical Optimization" (2nd ed., 2006): line
    search Newton with Hessian modification (Alg. 3.2 and 3.3) and line search Newton-CG
    (Alg. 7.1).

    Like :class:`torch.optim.LBFGS`, one call of :meth:`step` runs up to ``max_iter``
    iterations on a deterministic closure; the optimizer holds only global state, in the
    state of the first parameter: ``n_iter``, ``func_evals``, ``hess_evals`` (dense
    Hessians for ``"exact"``, Hessian-vector products for ``"cg"``, as scipy's ``nhev``),
    ``last_damping`` (the shift :math:`\mu` of the last iteration), ``status``,
    ``prev_loss`` and ``prev_flat_grad``; all tensors or Python numbers, so a saved state
    dict loads with ``torch.load(weights_only=True)``.

    .. note::
        Conventions:

        * Two closure styles work, told apart at every call by whether the closure writes
          ``p.grad`` (a new tensor or a bumped version counter); the optimizer itself never
          writes ``p.grad``:

          - the closure returns the loss tensor with its graph and calls no ``backward()``:
            gradients and exact second derivatives (the dense Hessian, or Pearlmutter's
            Hessian-vector products for ``"cg"``) come from :func:`torch.autograd.grad` with
            ``create_graph=True``, and ``p.grad`` is neither read nor written;
          - the closure of :class:`torch.optim.LBFGS` (``zero_grad()``, loss,
            ``loss.backward()``, return the loss): the gradient is read from ``p.grad``,
            which keeps what the last closure call wrote, and second derivatives are
            differences of gradients, as in scipy's Newton-CG without ``hess`` or ``hessp``
            (``approx_fhess_p``). A product is
            :math:`\nabla^2 f \, v \approx (g(\theta + h v) - g(\theta)) / h` with
            :math:`h = \sqrt{\epsilon} \max(1, \max_{v_i \ne 0} |\theta_i|) / \|v\|_\infty`, one
            closure call; the dense Hessian is formed column by column with scipy's
            '2-point' steps :math:`h_i = \sqrt{\epsilon} \, \mathrm{sign}(\theta_i)
            \max(1, |\theta_i|)` and symmetrised, :math:`n` closure calls;
            :math:`\epsilon` is the machine epsilon of the (coarsest) parameter dtype. Both
            are accurate to about :math:`\sqrt{\epsilon}` relative (1e-8 in float64), so the
            direction is an inexact Newton step that converges to the same minimizer in
            practically as many iterations (measured on Rosenbrock, an ill-conditioned
            quadratic and a logistic regression: within one iteration of the exact
            Hessian's). The parameters are put back exactly after every difference.
            ``func_evals`` counts every closure call, these included; ``hess_evals`` counts
            Hessians (or products) however they are obtained (scipy counts difference
            products only as gradient evaluations, ``nhev = 0``).

          A parameter with no gradient path to the loss (unused by it, not requiring grad,
          or with ``p.grad`` still ``None`` after the closure) has a zero gradient and a zero
          Hessian row and column, as :class:`torch.optim.LBFGS` treats it; ``"exact"``
          leaves such rows out of the Cholesky solve (their step is 0), so that they do not
          force a shift on the other parameters. When the returned loss reaches none of the
          parameters and the closure writes no ``p.grad``, the gradient is what ``p.grad``
          holds, as LBFGS reads it; with every ``p.grad`` ``None`` as well that is an error
          saying so (a zero gradient if no parameter requires grad).
        * ``damping`` is a Levenberg-style shift :math:`\lambda I` added to the Hessian at
          every iteration. With ``hessian="exact"``, when the shifted Hessian is not positive
          definite (its Cholesky factorization fails) the shift is raised for that iteration
          only, as in N&W Alg. 3.3 with :math:`\beta = 10^{-3} \max_i |h_{ii}|`: from
          :math:`-\min_i h_{ii} + \beta` if the diagonal has a non-positive entry, then by
          doubling. So the direction is always a descent direction, and on a strictly
          convex function with ``damping=0`` it is the pure Newton step.
        * With ``hessian="cg"`` the Newton system is solved inexactly by CG with the forcing
          term :math:`\eta_k = \min(0.5, \sqrt{\|g_k\|_2})` (N&W eq. 7.3 with the choice
          that gives superlinear convergence); negative curvature stops CG (N&W Alg. 7.1),
          so no automatic shift is needed. scipy's Newton-CG uses the same forcing term with
          1-norms, and stops on the step size (``xtol``) instead of the gradient.
        * The first trial step of the line search is ``lr``, capped from the second
          iteration on by N&W eq. 3.60 (:math:`1.01 \cdot 2 (f_k - f_{k-1}) / g_k^\top p_k`)
          as in scipy; near a minimizer the cap exceeds 1, so the unit Newton step (and
          quadratic convergence) is kept.
        * ``line_search=None`` takes the full step :math:`\alpha = \gamma` (quadratic
          convergence near a minimizer, no globalization); ``"exact_quadratic"`` takes
          :math:`\alpha = -g^\top p / p^\top \nabla^2 f \, p`.
        * All parameters are optimized as one flat vector (float64 if any parameter is
          float64, float32 otherwise); only one parameter group is supported.

    Memory and size limit: ``hessian="exact"`` stores the dense :math:`n \times n` Hessian
    and its Cholesky factor (:math:`2 n^2` elements) and costs :math:`n` Hessian-vector
    products (:math:`n` closure calls with a closure that calls ``backward()``) plus
    :math:`n^3/3` flops per iteration, so it refuses models with more than
    ``max_hessian_size`` parameters (default 5000: 400 MB in float64). ``hessian="cg"``
    stores a few vectors of :math:`n` elements plus the double-backward graph, and costs one
    Hessian-vector product (about two backward passes, or one closure call) per CG
    iteration.

    Args:
        params (iterable): iterable of parameters to optimize (one group).
        lr (float or Tensor, optional): first trial step of the line search, or the fixed
            step when ``line_search=None``; a 1-element tensor is read once per
            :meth:`step` (default: 1)
        max_iter (int, optional): maximal number of iterations per :meth:`step`
            (default: 20)
        tolerance_grad (float, optional): stop when :math:`\|g\|_\infty` is at most this
            (default: 1e-7)
        tolerance_change (float, optional): stop when the step (max-norm) or the change of
            the loss is below this (default: 1e-9)
        line_search (str or None, optional): ``"strong_wolfe"`` (N&W Alg. 3.5/3.6 with
            :math:`c_1 = 10^{-4}, c_2 = 0.9`), ``"exact_quadratic"`` or ``None``
            (default: ``"strong_wolfe"``)
        hessian (str, optional): ``"exact"`` (dense Hessian, Cholesky solve) or ``"cg"``
            (Hessian-free Newton-CG) (default: ``"exact"``)
        damping (float, optional): Levenberg shift :math:`\lambda` added to the Hessian's
            diagonal (default: 0)
        max_hessian_size (int, optional): largest number of parameters accepted with
            ``hessian="exact"`` (default: 5000)
        cg_max_iter (int, optional): CG iterations per Newton-CG direction; ``None`` means
            :math:`20 n` as in scipy (default: None)

    Example:
        >>> import torch
        >>> from microadam.optim import Newton
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> optimizer = Newton([x], max_iter=50, tolerance_grad=1e-10)
        >>> def closure():
        ...     return 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        >>> loss = optimizer.step(closure)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True

    References:
        J. Nocedal and S. J. Wright, "Numerical Optimization", 2nd ed., Springer, 2006:
        ch. 3 (Alg. 3.2, 3.3, 3.5, 3.6) and ch. 7 (Alg. 7.1); B. A. Pearlmutter, "Fast exact
        multiplication by the Hessian", Neural Computation 6(1), 1994.
    """
