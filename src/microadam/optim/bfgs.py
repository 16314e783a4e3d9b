"""BFGS: the quasi-Newton method with a dense inverse-Hessian approximation.

The class is thin (validation, ``defaults``, global state in the first parameter's state);
the step length and the iteration loop are shared with Newton in
:mod:`microadam.optim.line_search`, and the update of the inverse Hessian is
:func:`bfgs_update_`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from microadam.optim._common import check_flag
from microadam.optim.line_search import (
    ClosureObjective,
    check_single_group,
    run_line_search_method,
    validate_line_search_hyperparameters,
)

__all__ = ["BFGS", "bfgs_update_"]


def bfgs_update_(
    inverse_hessian: Tensor | None, s: Tensor, y: Tensor, initial_scaling: bool = False
) -> Tensor | None:
    """Apply the BFGS update (N&W eq. 6.17) to ``H`` in place and return it.

    .. math::
        H_{k+1} = (I - \\rho s y^\\top) H_k (I - \\rho y s^\\top) + \\rho s s^\\top,
        \\qquad \\rho = 1 / (y^\\top s),

    expanded (``H`` symmetric) as
    :math:`H - \\rho (s u^\\top + u s^\\top) + (\\rho^2 y^\\top u + \\rho) s s^\\top` with
    :math:`u = H y`: three rank-one updates, :math:`O(n^2)` instead of two matrix products.

    ``inverse_hessian=None`` stands for "no update yet", :math:`H_0 = I`; with
    ``initial_scaling`` it is first rescaled to :math:`\\frac{s^\\top y}{y^\\top y} I`
    (N&W eq. 6.20).

    The update is skipped (``H`` returned unchanged) unless :math:`s^\\top y` is safely positive,
    :math:`s^\\top y > \\epsilon \\|s\\| \\|y\\|`: without positive curvature the updated ``H``
    would not be positive definite (N&W §6.1). A strong-Wolfe step on a smooth function always
    has :math:`s^\\top y > 0`, so skips only happen after failed line searches, with
    ``line_search=None``, or through rounding near the minimum.
    """
    ys = float(y.dot(s))
    eps = torch.finfo(s.dtype).eps
    if not ys > eps * float(s.norm()) * float(y.norm()):
        return inverse_hessian
    if inverse_hessian is None:
        inverse_hessian = torch.eye(s.numel(), dtype=s.dtype, device=s.device)
        if initial_scaling:
            inverse_hessian.mul_(ys / float(y.dot(y)))
    rho = 1.0 / ys
    u = inverse_hessian.mv(y)
    yu = float(y.dot(u))
    inverse_hessian.addr_(s, u, alpha=-rho)
    inverse_hessian.addr_(u, s, alpha=-rho)
    inverse_hessian.addr_(s, s, alpha=rho * rho * yu + rho)
    return inverse_hessian


class BFGS(Optimizer):
    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        max_iter: int = 20,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        line_search: str | None = "strong_wolfe",
        initial_scaling: bool = False,
    ) -> None:
        validate_line_search_hyperparameters(
            lr, max_iter, tolerance_grad, tolerance_change, line_search
        )
        check_flag("initial_scaling", initial_scaling)
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "line_search": line_search,
            "initial_scaling": initial_scaling,
        }
        super().__init__(params, defaults)
        check_single_group(self, "BFGS")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` BFGS iterations.

        Args:
            closure (Callable): re-evaluates the model and returns the loss (required):
                the loss tensor with its graph, or, as for :class:`torch.optim.LBFGS`, the
                loss after ``zero_grad()`` and ``loss.backward()``.

        Returns:
            The loss returned by the first call of the closure, detached.
        """
        if closure is None:
            raise RuntimeError(
                "BFGS requires a closure that re-evaluates the model and returns the loss: "
                "optimizer.step(closure)"
            )
        # add_param_group() may have run since __init__.
        check_single_group(self, "BFGS", RuntimeError)
        group = self.param_groups[0]
        params = group["params"]
        # Only global state, kept in the first parameter's state as torch.optim.LBFGS does
        # (so that load_state_dict casts it with the parameters).
        state = self.state[params[0]]
        objective = ClosureObjective(closure, params, "BFGS")

        def direction(g: Tensor) -> Tensor | None:
            hess_inv = state.get("inverse_hessian")
            return None if hess_inv is None else hess_inv.mv(g).neg_()

        def update(s: Tensor, y: Tensor) -> None:
            hess_inv = bfgs_update_(state.get("inverse_hessian"), s, y, group["initial_scaling"])
            if hess_inv is not None:
                state["inverse_hessian"] = hess_inv

        def reset() -> None:
            # Back to H0 = I (and the rescaling at the next update): the current H gave an
            # ascent direction or a direction along which no step decreases the loss.
            state.pop("inverse_hessian", None)

        return run_line_search_method(objective, state, group, direction, update, reset)


BFGS.__doc__ = r"""Implements BFGS with a dense inverse-Hessian approximation.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{input}: \gamma \text{ (lr)}, \: \theta_0 \text{ (params)},
                \: f(\theta) \text{ (closure)}, \: \tau_g \text{ (tolerance\_grad)},
                \: \tau_c \text{ (tolerance\_change)}                                     \\
            &\textbf{initialize}: H_0 \leftarrow I                                        \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\
            &\textbf{for} \: k=0 \: \textbf{to} \: \textit{max\_iter}-1 \: \textbf{do}     \\
            &\hspace{5mm} g_k \leftarrow \nabla f(\theta_k); \:
                \textbf{if} \: \|g_k\|_\infty \le \tau_g \: \textbf{break}                 \\
            &\hspace{5mm} p_k \leftarrow -H_k g_k                                         \\
            &\hspace{5mm} \alpha_k \leftarrow \text{strong-Wolfe search from }
                \alpha = \gamma \min\big(1, 2.02 \, \tfrac{f_k - f_{k-1}}{g_k^\top p_k}\big)
                \: \big(\gamma \min(1, 1/\|g_k\|_2) \text{ while } H_k = I\big)         \\
            &\hspace{5mm} s_k \leftarrow \alpha_k p_k, \: \theta_{k+1} \leftarrow
                \theta_k + s_k, \: y_k \leftarrow g_{k+1} - g_k                           \\
            &\hspace{5mm} \textbf{if} \: s_k^\top y_k > 0:                                \\
            &\hspace{10mm} \textbf{if} \: \textit{initial\_scaling} \: \textbf{and} \:
                \text{first update}: \: H_k \leftarrow
                \frac{s_k^\top y_k}{y_k^\top y_k} I                                        \\
            &\hspace{10mm} \rho_k \leftarrow 1 / s_k^\top y_k, \:
                H_{k+1} \leftarrow (I - \rho_k s_k y_k^\top) H_k (I - \rho_k y_k s_k^\top)
                + \rho_k s_k s_k^\top                                                     \\
            &\hspace{5mm} \textbf{if} \: \|s_k\|_\infty \le \tau_c \: \textbf{or} \:
                |f(\theta_{k+1}) - f(\theta_k)| < \tau_c \: \textbf{break}                 \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \: \theta_k                                                      \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    For the details see Nocedal & Wright, "Numerical Optimization" (2nd ed., 2006), Alg. 6.1.

    Like :class:`torch.optim.LBFGS`, one call of :meth:`step` runs up to ``max_iter``
    iterations on a deterministic closure; the optimizer holds only global state, in the
    state of the first parameter: ``inverse_hessian`` (:math:`H`, absent until the first
    update), ``n_iter``, ``func_evals``, ``hess_evals``, ``status``, ``prev_loss`` and
    ``prev_flat_grad``. Everything is a tensor or a Python number, so a state dict saved with
    :func:`torch.save` loads with ``torch.load(weights_only=True)``.

    .. note::
        Conventions, and where they differ from ``scipy.optimize.minimize(method="BFGS")``:

        * :math:`H_0 = I` and the first trial step of each line search follows N&W eq. 3.60
          (:math:`\min(1, 1.01 \cdot 2 (f_k - f_{k-1}) / g_k^\top p_k)`, the unit step once
          the decrease settles), both as scipy: iteration and evaluation counts match
          scipy's. ``initial_scaling=True`` rescales :math:`H_0` to
          :math:`\frac{s^\top y}{y^\top y} I` just before the first update (N&W eq. 6.20).
          It is off by default because on ill-conditioned problems it costs many
          iterations: :math:`s^\top y / y^\top y` is about the inverse of the *largest*
          curvature, so every direction not yet explored starts far too stiff and BFGS
          corrects too-small :math:`H` eigenvalues slowly (N&W §6.1, "self-correction").
          On a quadratic with condition number :math:`10^4` (:math:`n = 20`) it takes ~117
          iterations instead of 24.
        * The update is skipped when :math:`s^\top y \le \epsilon \|s\| \|y\|` (not safely
          positive): it would destroy positive definiteness. scipy updates anyway (and uses
          :math:`\rho = 1000` when :math:`s^\top y = 0`).
        * When :math:`-H g` is not a descent direction, or no step along it decreases the
          loss, :math:`H` is reset to :math:`I` and the iteration retries along :math:`-g`;
          only if that fails too does the step stop (``status == 2``, scipy's "precision
          loss").
        * The gradient test uses :math:`\|g\|_\infty` (scipy's ``gtol``, torch's
          ``tolerance_grad``); ``tolerance_change`` is torch LBFGS's test on the step and on
          the change of the loss.
        * Two closure styles work, told apart at every call by whether the closure writes
          ``p.grad`` (a new tensor or a bumped version counter); the optimizer itself never
          writes ``p.grad``. A closure that returns the loss tensor without calling
          ``backward()`` is differentiated with :func:`torch.autograd.grad`. The closure of
          :class:`torch.optim.LBFGS` (``zero_grad()``, loss, ``loss.backward()``, return the
          loss) gives its gradient in ``p.grad``, which keeps what the last closure call
          wrote. The Hessian-vector product of ``line_search="exact_quadratic"`` is then the
          difference :math:`(g(\theta + h p) - g(\theta)) / h`,
          :math:`h = \sqrt{\epsilon} \max(1, \max_{p_i \ne 0} |\theta_i|) / \|p\|_\infty`
          (one more closure call, counted in ``func_evals``; see
          :class:`~microadam.optim.Newton`). A parameter with no gradient path to the loss
          (unused by it, or with ``p.grad`` still ``None`` after the closure) has a zero
          gradient, as in LBFGS. When the returned loss reaches none of the parameters and
          the closure writes no ``p.grad``, the gradient is what ``p.grad`` holds, as LBFGS
          reads it; with every ``p.grad`` ``None`` as well that is an error saying so (a
          zero gradient if no parameter requires grad).
        * All parameters are optimized as one flat vector (float64 if any parameter is
          float64, float32 otherwise); only one parameter group is supported.

    Memory: :math:`n^2` elements for :math:`H` plus a few vectors of :math:`n` elements
    (:math:`n` = number of parameters): 80 MB in float64 at :math:`n = 3162`. For larger
    models use :class:`torch.optim.LBFGS`, or Newton-CG (:class:`~microadam.optim.Newton`
    with ``hessian="cg"``).

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
            :math:`c_1 = 10^{-4}, c_2 = 0.9`); ``"exact_quadratic"``: the step
            :math:`\alpha = -g^\top p / p^\top \nabla^2 f \, p` from one Hessian-vector
            product, the exact line minimum on a quadratic (then BFGS ends in at most
            :math:`n` iterations, N&W Thm. 6.4), falling back to the strong-Wolfe search
            where it fails to decrease the loss; ``None``: fixed step ``lr`` (times
            :math:`\min(1, 1/\|g\|_2)` while :math:`H = I`, as the first LBFGS step)
            (default: ``"strong_wolfe"``)
        initial_scaling (bool, optional): rescale :math:`H_0` to
            :math:`\frac{s^\top y}{y^\top y} I` before the first update (N&W eq. 6.20)
            (default: False, as scipy)

    Example:
        >>> import torch
        >>> from microadam.optim import BFGS
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> optimizer = BFGS([x], max_iter=100, tolerance_grad=1e-10)
        >>> def closure():
        ...     return 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2
        >>> loss = optimizer.step(closure)
        >>> torch.allclose(x, torch.ones(2, dtype=torch.float64))
        True

    References:
        J. Nocedal and S. J. Wright, "Numerical Optimization", 2nd ed., Springer, 2006:
        ch. 6 (BFGS, Alg. 6.1, eqs. 6.17 and 6.20) and ch. 3 (line search, Alg. 3.5/3.6).
    """
