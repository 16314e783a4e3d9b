"""``minimize``: a scipy-like front end to :class:`BFGS` and :class:`Newton` for functions of
one tensor.

It builds the optimizer on a copy of ``x0``, runs one ``step`` with ``max_iter`` iterations,
and reads the outcome from the optimizer's state; the algorithms themselves live in the
optimizer classes. It needs only torch (NumPy arrays are accepted, not required).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from microadam.optim.bfgs import BFGS
from microadam.optim.line_search import StopReason
from microadam.optim.newton import Newton

__all__ = ["METHODS", "OptimizeResult", "minimize"]

METHODS = ("bfgs", "newton", "newton-cg")

# scipy.optimize._optimize._status_message, for the outcomes these solvers have.
_MESSAGES = {
    StopReason.CONVERGED: "Optimization terminated successfully.",
    StopReason.SMALL_CHANGE: "Optimization terminated successfully.",
    StopReason.MAX_ITER: "Maximum number of iterations has been exceeded.",
    StopReason.PRECISION_LOSS: "Desired error not necessarily achieved due to precision loss.",
    StopReason.NAN: "NaN result encountered.",
}


@dataclass
class OptimizeResult:
    """The outcome of :func:`minimize`, with the fields of ``scipy.optimize.OptimizeResult``.

    Attributes:
        x: the solution, a tensor with the shape and dtype of ``x0``.
        fun: ``fun(x)``.
        grad: the gradient at ``x`` (scipy's ``jac``).
        nit: iterations performed.
        nfev: evaluations of ``fun``.
        njev: gradient evaluations (each evaluation of ``fun`` is differentiated once, so
            ``njev == nfev``).
        nhev: Hessian evaluations (``"newton"``) or Hessian-vector products
            (``"newton-cg"``); 0 for ``"bfgs"``.
        success: whether the solver stopped on a convergence test.
        status: 0 converged (gradient or ``tolerance_change`` test), 1 maximum number of
            iterations, 2 precision loss (no decrease found along the direction or along
            the negative gradient), 3 NaN, as in scipy.
        message: scipy's message for ``status``.
        hess_inv: the final BFGS inverse-Hessian approximation (``None`` for Newton, or
            before the first BFGS update).
    """

    x: Tensor
    fun: float
    grad: Tensor
    nit: int
    nfev: int
    njev: int
    nhev: int
    success: bool
    status: int
    message: str
    hess_inv: Tensor | None = None


def minimize(
    fun: Callable[[Tensor], Tensor],
    x0: Any,
    method: str = "bfgs",
    *,
    tol: float = 1e-5,
    max_iter: int | None = None,
    tolerance_change: float = 0.0,
    **options: Any,
) -> OptimizeResult:
    """Minimize a scalar function of one tensor with BFGS, Newton or Newton-CG.

    Args:
        fun: ``x -> loss``: a scalar tensor computed from ``x`` with torch operations
            (gradients and Hessian-vector products come from autograd).
        x0: starting point: a tensor, a NumPy array, or anything :func:`numpy.asarray`
            accepts; lists and integer input become float64. ``x`` keeps the shape and
            floating dtype of ``x0`` (scipy flattens it).
        method: ``"bfgs"`` (:class:`BFGS`), ``"newton"`` (:class:`Newton` with the exact
            Hessian) or ``"newton-cg"`` (:class:`Newton` with ``hessian="cg"``);
            case-insensitive.
        tol: stop when :math:`\\|g\\|_\\infty \\le` ``tol`` (the optimizers'
            ``tolerance_grad``, scipy's BFGS ``gtol``; default 1e-5 as scipy).
        max_iter: maximal number of iterations; default ``200 * x0.numel()`` as scipy.
        tolerance_change: the optimizers' test on the step and the change of ``fun``.
            Default 0 (off), as scipy's BFGS, so that a run stops on the gradient test.
        **options: further optimizer arguments (``line_search``, ``lr``, ``damping``,
            ``max_hessian_size``, ``cg_max_iter``).

    Returns:
        :class:`OptimizeResult`.

    Example:
        >>> import torch
        >>> from microadam.optim import minimize
        >>> def rosenbrock(x):
        ...     return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        >>> res = minimize(rosenbrock, [-1.2, 1.0], "bfgs", tol=1e-9)
        >>> res.success, res.nit, res.message
        (True, 34, 'Optimization terminated successfully.')
        >>> torch.allclose(res.x, torch.ones(2, dtype=torch.float64))
        True
        >>> minimize(lambda x: ((x - 3.0) ** 2).sum(), torch.zeros(4), "newton").nit
        1
    """
    name = method.lower() if isinstance(method, str) else method
    if name not in METHODS:
        raise ValueError(
            f"Invalid method: {method!r} (expected one of 'bfgs', 'newton', 'newton-cg')"
        )
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0.0:
        raise ValueError(f"Invalid tol: {tol} (expected tol >= 0)")
    # Lists and Python numbers become float64, as in scipy (torch would make them float32);
    # tensors and NumPy arrays (anything with a dtype) keep their floating dtype.
    if hasattr(x0, "dtype"):
        x = torch.as_tensor(x0).detach().clone()
    else:
        x = torch.as_tensor(x0, dtype=torch.float64).clone()
    if not x.is_floating_point():
        x = x.to(torch.float64)
    x.requires_grad_(True)
    if max_iter is None:
        max_iter = 200 * max(1, x.numel())
    settings = {"max_iter": max_iter, "tolerance_grad": tol, "tolerance_change": tolerance_change}
    if name == "bfgs":
        optimizer: BFGS | Newton = BFGS([x], **settings, **options)
    else:
        hessian = "exact" if name == "newton" else "cg"
        optimizer = Newton([x], hessian=hessian, **settings, **options)

    optimizer.step(lambda: fun(x))

    state = optimizer.state[x]
    reason = StopReason(state["status"])
    return OptimizeResult(
        x=x.detach(),
        fun=float(state["prev_loss"]),
        grad=state["prev_flat_grad"].reshape(x.shape).to(x.dtype),
        nit=int(state["n_iter"]),
        nfev=int(state["func_evals"]),
        njev=int(state["func_evals"]),
        nhev=int(state["hess_evals"]),
        success=reason in (StopReason.CONVERGED, StopReason.SMALL_CHANGE),
        status=0 if reason == StopReason.SMALL_CHANGE else int(reason),
        message=_MESSAGES[reason],
        hess_inv=state.get("inverse_hessian"),
    )
