"""Line-search methods: a strong-Wolfe line search and the descent loop that uses it.

A line-search method (Nocedal & Wright, "Numerical Optimization", 2nd ed., ch. 3) iterates

.. math::
    x_{k+1} = x_k + \\alpha_k p_k,

where the *direction* :math:`p_k` is what distinguishes the methods (:math:`-H_k g_k` for BFGS,
:math:`-(\\nabla^2 f_k)^{-1} g_k` for Newton) and the *step length* :math:`\\alpha_k` comes from
a one-dimensional search along :math:`p_k`. Everything the methods share lives here:

* :func:`strong_wolfe`: bracketing (N&W Alg. 3.5) and zoom (Alg. 3.6) with safeguarded cubic
  interpolation (eq. 3.59), on a scalar function ``phi(alpha) -> (f, dphi, grad)``;
* :class:`ClosureObjective`: evaluates an optimizer closure on the parameters seen as one flat
  vector, with gradients and, on request, Hessian-vector products or the dense Hessian: from
  autograd when the closure returns the loss with its graph, from ``p.grad`` and
  differences of gradients when the closure calls ``backward()`` itself, as the closures
  written for :class:`torch.optim.LBFGS` do; ``p.grad`` is never written;
* :func:`run_line_search_method`: the outer loop of one ``step`` (tolerances, ``max_iter``,
  line-search failure handling), parameterised by the direction and the update after a step.

The optimizers :class:`~microadam.optim.bfgs.BFGS` and :class:`~microadam.optim.newton.Newton`
only supply a direction and, for BFGS, the inverse-Hessian update.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import torch
from torch import Tensor

from microadam.optim._common import check_int, check_nonnegative, check_positive

__all__ = [
    "C1",
    "C2",
    "LINE_SEARCHES",
    "MAX_LINE_SEARCH_EVALS",
    "ClosureObjective",
    "LineSearchResult",
    "StopReason",
    "check_single_group",
    "cubic_minimizer",
    "run_line_search_method",
    "strong_wolfe",
    "validate_line_search_hyperparameters",
]

# Sufficient-decrease (Armijo) constant: N&W p. 33 suggest c1 = 1e-4, as scipy and torch use.
C1 = 1e-4
# Curvature constant: N&W p. 34 recommend c2 = 0.9 for Newton and quasi-Newton directions,
# where the unit step is usually acceptable and an accurate search would waste evaluations.
C2 = 0.9
# Evaluations per line search, torch.optim.LBFGS's max_ls.
MAX_LINE_SEARCH_EVALS = 25
# Extrapolation bounds while bracketing, as multiples of the last increase of alpha (the
# constants of Moré & Thuente's search, xtrapl = 1.1 and xtrapu = 4): the trial grows at least
# geometrically, so a bracket is found in O(log) evaluations, but never jumps wildly.
_EXTRAPOLATION_MIN = 1.1
_EXTRAPOLATION_MAX = 4.0
# While zooming, a trial stays this fraction of the interval away from both ends, so every
# evaluation shrinks the interval by at least 10 %: cubic interpolation alone can stall next to
# an endpoint (N&W p. 61, "safeguards").
_ZOOM_MARGIN = 0.1

LINE_SEARCHES = ("strong_wolfe", "exact_quadratic", None)


class StopReason(IntEnum):
    """Why the last ``step`` stopped; stored as a plain ``int`` in the optimizer state.

    The numbers follow ``scipy.optimize``'s ``status`` where scipy has the concept.
    """

    CONVERGED = 0  # max |g| <= tolerance_grad
    MAX_ITER = 1  # max_iter iterations done
    PRECISION_LOSS = 2  # no step along the direction or along -g decreases f
    NAN = 3  # loss or gradient not finite
    SMALL_CHANGE = 4  # max |step| or |f change| below tolerance_change


class LineSearchResult(NamedTuple):
    """Outcome of :func:`strong_wolfe`.

    ``alpha`` is the accepted step; when ``success`` is False it is the best point found that
    satisfies the sufficient-decrease condition (``alpha == 0`` when there is none, i.e. the
    search made no progress). ``grad`` is the full gradient at ``alpha``.
    """

    alpha: float
    loss: float
    derivative: float
    grad: Tensor
    evals: int
    success: bool


class _Point(NamedTuple):
    alpha: float
    f: float
    dphi: float
    grad: Tensor


def cubic_minimizer(a: float, fa: float, da: float, b: float, fb: float, db: float) -> float:
    """Minimizer of the cubic interpolating ``f`` and ``f'`` at ``a`` and ``b`` (N&W eq. 3.59).

    Returns ``nan`` when the cubic has no local minimizer (negative discriminant) or the data
    are degenerate; callers then bisect.
    """
    if a == b:
        return math.nan
    d1 = da + db - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    if not disc >= 0.0:  # also catches nan
        return math.nan
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = db - da + 2.0 * d2
    if denom == 0.0:
        return math.nan
    return b - (b - a) * (db + d2 - d1) / denom


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def strong_wolfe(
    phi: Callable[[float], tuple[float, float, Tensor]],
    f0: float,
    dphi0: float,
    g0: Tensor,
    alpha_init: float = 1.0,
    *,
    c1: float = C1,
    c2: float = C2,
    max_evals: int = MAX_LINE_SEARCH_EVALS,
    alpha_tolerance: float = 0.0,
    alpha_max: float = 1e10,
) -> LineSearchResult:
    """Find a step satisfying the strong Wolfe conditions (N&W Alg. 3.5 and 3.6).

    The conditions on :math:`\\phi(\\alpha) = f(x + \\alpha p)` are

    .. math::
        \\phi(\\alpha) \\le \\phi(0) + c_1 \\alpha \\phi'(0), \\qquad
        |\\phi'(\\alpha)| \\le c_2 |\\phi'(0)|.

    Args:
        phi: ``alpha -> (f, dphi, grad)``: the loss, its derivative along the direction and the
            full gradient at ``x + alpha p``. Non-finite values mark the step as too long.
        f0, dphi0, g0: the same at ``alpha = 0``; ``dphi0`` must be negative.
        alpha_init: first trial step.
        c1, c2: Wolfe constants, ``0 < c1 < c2 < 1``.
        max_evals: evaluations of ``phi`` allowed.
        alpha_tolerance: the zoom gives up once the bracket is shorter than this (in units of
            alpha); it also gives up when the bracket reaches floating-point resolution.
        alpha_max: largest step tried while bracketing.

    Returns:
        :class:`LineSearchResult`.
    """
    if not dphi0 < 0.0:
        raise ValueError(f"Invalid dphi0: {dphi0} (expected a descent direction, dphi0 < 0)")
    if not 0.0 < c1 < c2 < 1.0:
        raise ValueError(f"Invalid c1, c2: {c1}, {c2} (expected 0 < c1 < c2 < 1)")
    start = _Point(0.0, f0, dphi0, g0)
    prev = start
    alpha = min(alpha_init, alpha_max)
    evals = 0
    cur = start
    # Alg. 3.5: increase alpha until the interval (prev, alpha) must contain a Wolfe point.
    while evals < max_evals:
        f, dphi, g = phi(alpha)
        evals += 1
        cur = _Point(alpha, f, dphi, g)
        if not _finite(f, dphi):
            # Overflow or leaving the function's domain: the step is too long.
            return _zoom(phi, start, prev, cur, evals, c1, c2, max_evals, alpha_tolerance)
        if f > f0 + c1 * alpha * dphi0 or (evals > 1 and f >= prev.f):
            return _zoom(phi, start, prev, cur, evals, c1, c2, max_evals, alpha_tolerance)
        if abs(dphi) <= -c2 * dphi0:
            return LineSearchResult(alpha, f, dphi, g, evals, True)
        if dphi >= 0.0:
            return _zoom(phi, start, cur, prev, evals, c1, c2, max_evals, alpha_tolerance)
        if alpha >= alpha_max:
            break
        # Still descending: extrapolate with the cubic through prev and cur, safeguarded.
        increase = alpha - prev.alpha
        lower = alpha + _EXTRAPOLATION_MIN * increase
        upper = min(alpha + _EXTRAPOLATION_MAX * increase, alpha_max)
        trial = cubic_minimizer(prev.alpha, prev.f, prev.dphi, alpha, f, dphi)
        if not math.isfinite(trial):
            trial = upper
        prev = cur
        alpha = min(max(trial, lower), upper)
    # Out of evaluations while still descending: cur has the lowest f seen and sufficient
    # decrease, so it is progress even though the curvature condition does not hold.
    return LineSearchResult(cur.alpha, cur.f, cur.dphi, cur.grad, evals, False)


def _zoom(
    phi: Callable[[float], tuple[float, float, Tensor]],
    start: _Point,
    lo: _Point,
    hi: _Point,
    evals: int,
    c1: float,
    c2: float,
    max_evals: int,
    alpha_tolerance: float,
) -> LineSearchResult:
    """N&W Alg. 3.6. Invariants: ``lo`` has sufficient decrease and the lowest ``f`` so far;
    ``phi'(lo) (hi - lo) < 0``, so a Wolfe point lies between them."""
    f0, dphi0 = start.f, start.dphi
    while evals < max_evals:
        a_min, a_max = min(lo.alpha, hi.alpha), max(lo.alpha, hi.alpha)
        width = a_max - a_min
        if width <= alpha_tolerance:
            break
        trial = math.nan
        if _finite(hi.f, hi.dphi):
            trial = cubic_minimizer(lo.alpha, lo.f, lo.dphi, hi.alpha, hi.f, hi.dphi)
        if not math.isfinite(trial):
            trial = 0.5 * (a_min + a_max)
        margin = _ZOOM_MARGIN * width
        alpha = min(max(trial, a_min + margin), a_max - margin)
        if not a_min < alpha < a_max:
            break  # the bracket is at floating-point resolution
        f, dphi, g = phi(alpha)
        evals += 1
        cur = _Point(alpha, f, dphi, g)
        if not _finite(f, dphi) or f > f0 + c1 * alpha * dphi0 or f >= lo.f:
            hi = cur
        else:
            if abs(dphi) <= -c2 * dphi0:
                return LineSearchResult(alpha, f, dphi, g, evals, True)
            if dphi * (hi.alpha - lo.alpha) >= 0.0:
                hi = lo
            lo = cur
    return LineSearchResult(lo.alpha, lo.f, lo.dphi, lo.grad, evals, False)


class ClosureObjective:
    """An optimizer closure seen as a function of one flat parameter vector.

    Two closure styles are accepted, told apart at every call by whether the closure wrote
    ``p.grad`` (a new tensor, or a bumped version counter, compared with what ``p.grad`` held
    just before the call). The optimizer itself never writes ``p.grad``.

    * *loss style*: the closure returns the loss tensor with its autograd graph and writes no
      ``p.grad``. The gradient comes from :func:`torch.autograd.grad` on that loss; ``p.grad``
      is neither read nor written. With ``create_graph=True`` the gradient keeps its graph,
      which :meth:`hessian_vector_product` and :meth:`hessian` differentiate again: exact
      second derivatives. The graph belongs to the point where it was evaluated and is
      dropped as soon as the parameters move.
    * *backward style*, the closure of :class:`torch.optim.LBFGS` (``zero_grad()``, loss,
      ``loss.backward()``, return the loss; a Python number is accepted as the loss too): the
      gradient is read from ``p.grad``, which keeps what the closure wrote, as in LBFGS.
      Second derivatives are then differences of gradients, as scipy's Newton-CG without
      ``hessp`` (:meth:`hessian_vector_product`: one closure call; :meth:`hessian`: one
      per parameter element), with the parameters put back exactly afterwards. Every such
      call is counted in ``evals``.

    A parameter without a gradient path to the loss (unused by it, not requiring grad, or
    its ``p.grad`` still ``None``) has a zero gradient and zero second derivatives, as in
    LBFGS. When the returned loss reaches no parameter at all and the closure wrote no
    ``p.grad``, the gradient is whatever ``p.grad`` holds, as LBFGS reads it (a gradient
    computed before the step, say); if every ``p.grad`` is ``None`` too, that is an error
    that says so, unless no parameter requires grad (then the gradient is zero).

    Flat vectors are float64 if any parameter is float64, float32 otherwise.
    """

    def __init__(self, closure: Callable[[], Any], params: Sequence[Tensor], owner: str):
        self._closure = closure
        self.params = list(params)
        self.owner = owner
        self.dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        )
        self.numel = sum(p.numel() for p in self.params)
        # Relative step of the gradient differences: sqrt of the machine epsilon of the
        # coarsest parameter dtype, scipy's '2-point' rule (``_eps_for_method``: the
        # gradient is only as accurate as the lowest precision it is computed in).
        self.relative_step = math.sqrt(
            max(
                (torch.finfo(p.dtype).eps for p in self.params if p.is_floating_point()),
                default=torch.finfo(self.dtype).eps,
            )
        )
        self.evals = 0
        self.hessian_vector_products = 0
        # Whether the last call's gradient was read from p.grad (backward style, or a loss
        # without gradient path) rather than differentiated from the returned loss.
        self.uses_p_grad: bool | None = None
        self._graph_grads: tuple[Tensor | None, ...] | None = None
        self._version = 0  # bumped whenever the parameters are written
        self._graph_version = -1
        self._last_grad: tuple[int, Tensor] | None = None  # (version, flat gradient)
        # The current line x + alpha d of line() and the alpha the parameters sit at.
        self._line: tuple[Tensor, Tensor] | None = None
        self._line_alpha: float | None = None

    # -- parameters -------------------------------------------------------------------------
    def flat_params(self) -> Tensor:
        """A copy of the parameters as one vector (``numel`` elements of ``dtype``)."""
        return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

    def set_flat_params(self, x: Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                n = p.numel()
                p.copy_(x[offset : offset + n].view_as(p))
                offset += n
        self._version += 1
        self._graph_grads = None  # the graph was built from the old values

    def _flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=self.dtype, device=p.device)
                if t is None
                else t.reshape(-1).to(self.dtype)
                for p, t in zip(self.params, tensors, strict=True)
            ]
        )

    def _autograd(self, outputs: Tensor, **kwargs: Any) -> tuple[Tensor | None, ...]:
        """:func:`torch.autograd.grad` with respect to the parameters that require grad,
        ``None`` (no gradient path) for unused parameters and for those that do not."""
        wrt = [p for p in self.params if p.requires_grad]
        if not wrt:
            return (None,) * len(self.params)
        grads = iter(torch.autograd.grad(outputs, wrt, allow_unused=True, **kwargs))
        return tuple(next(grads) if p.requires_grad else None for p in self.params)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, create_graph: bool = False) -> tuple[Any, float, Tensor]:
        """Call the closure at the current parameters.

        Returns ``(loss as returned, loss as float, flat detached gradient)``.
        """
        # What p.grad holds before the call (tensor and version counter), to see whether
        # the closure writes it: zero_grad() + backward() replaces the tensor, backward()
        # alone or zero_grad(set_to_none=False) + backward() bumps its version.
        before = [(p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        with torch.enable_grad():
            loss = self._closure()
            if loss is None:
                raise RuntimeError(f"{self.owner}: the closure returned None (expected the loss)")
            wrote = any(
                p.grad is not None and (p.grad is not grad or p.grad._version != version)
                for p, (grad, version) in zip(self.params, before, strict=True)
            )
            grads = None if wrote else self._loss_gradients(loss, create_graph)
        self.evals += 1
        if grads is not None:
            # Loss style: the returned loss differentiated; p.grad is not touched.
            self.uses_p_grad = False
            value = float(loss.detach())
            if create_graph:
                self._graph_grads = grads
                self._graph_version = self._version
        else:
            # The closure wrote p.grad (backward style), or its loss has no gradient path to
            # the parameters: the gradient is what p.grad holds, as torch.optim.LBFGS reads it.
            self.uses_p_grad = True
            self._graph_grads = None
            value = self._loss_value(loss)
            grads = tuple(p.grad for p in self.params)
            if not wrote and all(g is None for g in grads):
                if any(p.requires_grad for p in self.params):
                    raise RuntimeError(self._no_gradient_message(loss))
                # No parameter requires grad: nothing can have a gradient, so it is zero.
        flat = self._flatten([None if g is None else g.detach() for g in grads])
        self._last_grad = (self._version, flat)
        return loss, value, flat

    def _loss_value(self, loss: Any) -> float:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise RuntimeError(
                    f"{self.owner}: the closure returned a tensor of shape "
                    f"{tuple(loss.shape)} (expected the loss, a tensor with one element)"
                )
            return float(loss.detach())
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return float(loss)
        raise RuntimeError(
            f"{self.owner}: the closure returned a {type(loss).__name__} (expected the loss: "
            "a tensor with one element or a Python number)"
        )

    def _loss_gradients(self, loss: Any, create_graph: bool) -> tuple[Tensor | None, ...] | None:
        """Loss style: the gradient of the returned loss, or ``None`` when it has no gradient
        path to any parameter (not a tensor, does not require grad, or reaches none)."""
        if not isinstance(loss, Tensor):
            return None
        self._loss_value(loss)  # one element
        if not loss.requires_grad:
            return None
        try:
            grads = self._autograd(loss, create_graph=create_graph)
        except RuntimeError as err:
            # E.g. the closure differentiated the loss with torch.autograd.grad (which frees
            # the graph) without writing p.grad.
            raise RuntimeError(
                f"{self.owner}: could not differentiate the loss returned by the closure: {err}"
            ) from err
        return None if all(g is None for g in grads) else grads

    def _no_gradient_message(self, loss: Any) -> str:
        if not isinstance(loss, Tensor):
            return (
                f"{self.owner}: the closure returned a {type(loss).__name__}, not a tensor, and "
                "no parameter has a .grad: return the loss tensor computed from the parameters "
                "(the optimizer differentiates it), or compute the gradient in the closure "
                "(loss.backward()) as for torch.optim.LBFGS"
            )
        why = (
            "it does not require grad: computed under torch.no_grad(), or from detached tensors?"
            if not loss.requires_grad
            else "none of them has a gradient path to it"
        )
        return (
            f"{self.owner}: the loss returned by the closure does not depend on any of the "
            f"optimizer's parameters ({why}), and no parameter has a .grad"
        )

    def has_graph(self) -> bool:
        """Whether a gradient with its graph is available at the current parameters."""
        return self._graph_grads is not None and self._graph_version == self._version

    def second_order_ready(self) -> bool:
        """Whether second derivatives at the current parameters need no new evaluation with
        ``create_graph=True``: always when the gradient comes from ``p.grad`` (differences of
        gradients), when the graph is there for a loss-style closure."""
        return bool(self.uses_p_grad) or self.has_graph()

    def _graph_gradient(self) -> Tensor | None:
        grads = self._graph_grads
        if grads is None or self._graph_version != self._version:
            raise RuntimeError(
                f"{self.owner}: internal error: no gradient graph at the current parameters"
            )
        if not any(g is not None and g.requires_grad for g in grads):
            return None  # the gradient does not depend on the parameters: zero Hessian
        return torch.cat(
            [
                torch.zeros(p.numel(), dtype=self.dtype, device=p.device)
                if g is None or not g.requires_grad
                else g.reshape(-1).to(self.dtype)
                for p, g in zip(self.params, grads, strict=True)
            ]
        )

    def _gradient_here(self, grad: Tensor | None) -> Tensor:
        """The flat gradient at the current parameters: ``grad`` when the caller knows it,
        else the last evaluation's if it was here, else a new evaluation."""
        if grad is not None:
            return grad
        if self._last_grad is not None and self._last_grad[0] == self._version:
            return self._last_grad[1]
        return self.evaluate()[2]

    def hessian_vector_product(self, v: Tensor, grad: Tensor | None = None) -> Tensor:
        """:math:`\\nabla^2 f(x) v` at the current parameters :math:`x`.

        Loss style: exact, by differentiating :math:`g(x)^\\top v` (Pearlmutter). Backward
        style: the forward difference of scipy's ``approx_fhess_p``,
        :math:`(g(x + h v) - g(x)) / h`, one closure call, with the step
        :math:`h = \\sqrt{\\epsilon} \\max(1, \\max_{v_i \\ne 0} |x_i|) / \\|v\\|_\\infty`:
        scipy's '2-point' step :math:`\\sqrt{\\epsilon} \\max(1, |x_i|)` for the largest
        component of the move, :math:`\\epsilon` the machine epsilon of the coarsest parameter
        dtype. ``grad`` is :math:`g(x)` when the caller has it (differences only).
        """
        self.hessian_vector_products += 1
        if self.uses_p_grad:
            return self._difference_hessian_vector_product(v, self._gradient_here(grad))
        g = self._graph_gradient()
        if g is None:
            return torch.zeros_like(v)
        with torch.enable_grad():
            hv = self._autograd(g, grad_outputs=v.detach(), retain_graph=True)
        return self._flatten(hv)

    def _difference_hessian_vector_product(self, v: Tensor, g0: Tensor) -> Tensor:
        v_max = float(v.abs().max()) if v.numel() else 0.0
        if v_max == 0.0:
            return torch.zeros_like(v)
        if not math.isfinite(v_max):
            return torch.full_like(v, math.nan)
        x = self.flat_params()
        # scipy's approx_fhess_p steps epsilon * v with a fixed epsilon = sqrt(eps), which
        # is far too short (cancellation) or too long once |v| is far from 1; scaling by
        # max(1, |x|) / |v| makes the move a relative step of sqrt(eps) whatever v is. |x| is
        # taken over the components that move, so that parameters v does not touch (those
        # with no gradient path) do not change the step.
        x_max = float(x.abs().masked_fill_(v == 0, 0.0).max())
        h = self.relative_step * max(1.0, x_max) / v_max
        try:
            self.set_flat_params(torch.add(x, v, alpha=h))
            g1 = self.evaluate()[2]
        finally:
            self.set_flat_params(x)  # exactly back at x
        return g1.sub_(g0).div_(h)

    def hessian(self, grad: Tensor | None = None, chunk_size: int = 256) -> Tensor:
        """The dense, symmetrised Hessian at the current parameters.

        Loss style: exact, ``chunk_size`` rows per batched backward pass. Backward style:
        column by column, :math:`(g(x + h_i e_i) - g(x)) / h_i`, as scipy's
        ``hess='2-point'``: :math:`h_i = \\sqrt{\\epsilon}\\, \\mathrm{sign}(x_i)
        \\max(1, |x_i|)` (sign(0) = 1), divided by the step actually taken,
        :math:`(x_i + h_i) - x_i`; ``numel`` closure calls. ``grad`` is :math:`g(x)` when
        the caller has it (differences only).
        """
        if self.uses_p_grad:
            return self._difference_hessian(self._gradient_here(grad))
        n = self.numel
        g = self._graph_gradient()
        if g is None:
            return torch.zeros(n, n, dtype=self.dtype, device=self.params[0].device)
        rows = []
        with torch.enable_grad():
            for i in range(0, n, chunk_size):
                # Rows i .. i + k - 1 of the identity: k x n, not the whole n x n identity.
                k = min(chunk_size, n - i)
                basis = torch.zeros(k, n, dtype=self.dtype, device=g.device)
                basis[torch.arange(k), torch.arange(i, i + k)] = 1.0
                try:
                    parts = self._autograd(
                        g, grad_outputs=basis, retain_graph=True, is_grads_batched=True
                    )
                    block = torch.cat(
                        [
                            torch.zeros(k, p.numel(), dtype=self.dtype, device=g.device)
                            if h is None
                            else h.reshape(basis.shape[0], -1).to(self.dtype)
                            for p, h in zip(self.params, parts, strict=True)
                        ],
                        dim=1,
                    )
                except RuntimeError:
                    # Some backward formulas have no vmap rule: one product per row instead.
                    block = torch.stack(
                        [
                            self._flatten(self._autograd(g, grad_outputs=e, retain_graph=True))
                            for e in basis
                        ]
                    )
                rows.append(block)
        hess = torch.cat(rows)
        # Second derivatives commute in exact arithmetic; autograd's rows differ by rounding.
        return 0.5 * (hess + hess.T)

    def _difference_hessian(self, g0: Tensor) -> Tensor:
        x = self.flat_params()
        n = self.numel
        steps = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        steps.mul_(x.abs().clamp_min(1.0)).mul_(self.relative_step)
        hess = torch.empty(n, n, dtype=self.dtype, device=x.device)
        point = x.clone()
        try:
            i = 0
            for p in self.params:
                for _ in range(p.numel()):
                    point[i] = x[i] + steps[i]
                    self.set_flat_params(point)
                    # The step actually taken, once rounded to the parameter's dtype.
                    dx = float(point[i].to(p.dtype)) - float(x[i])
                    g1 = self.evaluate()[2]
                    hess[:, i] = g1.sub_(g0).div_(dx)
                    point[i] = x[i]
                    i += 1
        finally:
            self.set_flat_params(x)  # exactly back at x
        # Each column has its own truncation and rounding errors, so the difference matrix
        # is not symmetric: symmetrise it (N&W §8.1, "approximating the Hessian").
        return 0.5 * (hess + hess.T)

    def line(self, x: Tensor, d: Tensor, create_graph: bool) -> Callable[[float], tuple]:
        """``phi(alpha) -> (f, dphi, grad)`` along ``x + alpha d`` for :func:`strong_wolfe`.

        ``phi`` leaves the parameters at the last point it evaluated; :meth:`move_to` puts
        them at the accepted one (cheaply, keeping the graph, when that was the last one).
        """
        self._line = (x, d)
        self._line_alpha = 0.0  # the parameters are at x when the line is created

        def phi(alpha: float) -> tuple[float, float, Tensor]:
            self.set_flat_params(torch.add(x, d, alpha=alpha))
            _, f, g = self.evaluate(create_graph)
            self._line_alpha = alpha
            return f, float(g.dot(d)), g

        return phi

    def move_to(self, alpha: float) -> None:
        """Set the parameters to ``x + alpha d`` on the last :meth:`line`."""
        if self._line is not None and self._line_alpha != alpha:
            x, d = self._line
            self.set_flat_params(torch.add(x, d, alpha=alpha))
            self._line_alpha = alpha


def validate_line_search_hyperparameters(
    lr: float | Tensor,
    max_iter: int,
    tolerance_grad: float,
    tolerance_change: float,
    line_search: str | None,
) -> None:
    """The constructor checks shared by :class:`BFGS` and :class:`Newton`.

    ``lr`` may be a number or a real one-element tensor (as torch.optim's ``Tensor lr``); a
    tensor is read with ``float()`` once per ``step``, so changing it in place (a scheduler)
    takes effect at the next step.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.dtype == torch.bool or lr.is_complex():
            raise ValueError(
                f"Invalid lr: a {lr.dtype} tensor of shape {tuple(lr.shape)} "
                "(expected a number or a real 1-element tensor, lr > 0)"
            )
        if not float(lr) > 0.0:
            raise ValueError(f"Invalid lr: {lr!r} (expected lr > 0)")
    else:
        check_positive("lr", lr)
    check_int("max_iter", max_iter, 1)
    check_nonnegative("tolerance_grad", tolerance_grad)
    check_nonnegative("tolerance_change", tolerance_change)
    if line_search not in LINE_SEARCHES:
        raise ValueError(
            f"Invalid line_search: {line_search!r} "
            "(expected 'strong_wolfe', 'exact_quadratic' or None)"
        )


def check_single_group(
    optimizer: torch.optim.Optimizer, name: str, error: type[Exception] = ValueError
) -> None:
    """One parameter group of real floating-point tensors, as torch.optim.LBFGS requires."""
    if len(optimizer.param_groups) != 1:
        raise error(
            f"{name} doesn't support per-parameter options (parameter groups): "
            f"got {len(optimizer.param_groups)} groups, expected 1"
        )
    for p in optimizer.param_groups[0]["params"]:
        if not p.is_floating_point():
            raise ValueError(
                f"Invalid parameter dtype: {p.dtype} (expected a real floating-point dtype)"
            )


def run_line_search_method(
    objective: ClosureObjective,
    state: dict,
    group: dict,
    direction: Callable[[Tensor], Tensor | None],
    update: Callable[[Tensor, Tensor], None] | None = None,
    reset: Callable[[], None] | None = None,
    create_graph: bool = False,
) -> Any:
    """Run up to ``group["max_iter"]`` iterations of :math:`x \\leftarrow x + \\alpha p`.

    Args:
        objective: the closure on the flat parameters.
        state: the optimizer's global state (first parameter's); counters ``func_evals``,
            ``n_iter``, ``hess_evals``, the outcome ``status`` (a :class:`StopReason` as
            ``int``), and ``prev_loss`` / ``prev_flat_grad`` at the final parameters are kept.
        group: the single param group (``lr``, ``max_iter``, ``tolerance_grad``,
            ``tolerance_change``, ``line_search``).
        direction: ``g -> p`` at the current parameters, or ``None`` for "use ``-g``".
        update: called with ``(s, y) = (x_{k+1} - x_k, g_{k+1} - g_k)`` after every step.
        reset: called when the direction is unusable (not a descent direction, or no step
            along it decreases the loss) before falling back to ``-g``.
        create_graph: keep gradients' graphs (Newton, ``exact_quadratic`` line search).

    Returns:
        The loss the closure returned at the first evaluation, detached.
    """
    lr = float(group["lr"])
    tolerance_grad = group["tolerance_grad"]
    tolerance_change = group["tolerance_change"]
    line_search = group["line_search"]
    needs_graph = create_graph or line_search == "exact_quadratic"
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)
    state.setdefault("hess_evals", 0)

    first_loss, f, g = objective.evaluate(needs_graph)
    if isinstance(first_loss, Tensor):
        first_loss = first_loss.detach()
    status = StopReason.MAX_ITER
    if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
        status = StopReason.NAN
    elif float(g.abs().max()) <= tolerance_grad:
        status = StopReason.CONVERGED
    else:
        f_old: float | None = None
        for _ in range(group["max_iter"]):
            if needs_graph and not objective.second_order_ready():
                # The accepted point was not the last one evaluated: its graph is gone.
                _, f, g = objective.evaluate(True)
            x = objective.flat_params()
            d = direction(g)
            steepest = d is None
            if d is None or not float(g.dot(d)) < 0.0:
                if reset is not None and d is not None:
                    reset()
                d, steepest = g.neg(), True
            alpha0 = _initial_step(g, d, f, f_old, lr, steepest, line_search)
            step = _search(
                objective, line_search, x, f, g, d, alpha0, tolerance_change, needs_graph
            )
            if step is None and not steepest:
                # N&W §6.1: restart from steepest descent when the model direction fails.
                if reset is not None:
                    reset()
                objective.move_to(0.0)
                if needs_graph and not objective.second_order_ready():
                    objective.evaluate(True)  # the exact_quadratic step needs the graph at x
                d, steepest = g.neg(), True
                alpha0 = _initial_step(g, d, f, f_old, lr, steepest, line_search)
                step = _search(
                    objective, line_search, x, f, g, d, alpha0, tolerance_change, needs_graph
                )
            if step is None:
                objective.move_to(0.0)
                status = StopReason.PRECISION_LOSS
                break
            alpha, f_new, g_new = step
            state["n_iter"] += 1
            if not (math.isfinite(f_new) and bool(torch.isfinite(g_new).all())):
                f, g = f_new, g_new
                status = StopReason.NAN
                break
            s = d.mul(alpha)
            if update is not None:
                update(s, g_new - g)
            f_old, f, g = f, f_new, g_new
            if float(g.abs().max()) <= tolerance_grad:
                status = StopReason.CONVERGED
                break
            if float(s.abs().max()) <= tolerance_change or abs(f - f_old) < tolerance_change:
                status = StopReason.SMALL_CHANGE
                break
    state["func_evals"] += objective.evals
    state["hess_evals"] += objective.hessian_vector_products
    state["status"] = int(status)
    state["prev_loss"] = f
    state["prev_flat_grad"] = g
    return first_loss


def _initial_step(
    g: Tensor,
    d: Tensor,
    f: float,
    f_old: float | None,
    lr: float,
    steepest: bool,
    line_search: str | None,
) -> float:
    """First trial step: ``lr``, scaled down for a steepest-descent step (no curvature known),
    and capped by N&W eq. 3.60 for the strong-Wolfe search."""
    if steepest:
        # Without curvature information the trial step has length <= lr, as scipy's BFGS
        # (its first trial is about 1 / ||g||): -g itself can be far too long.
        norm = float(g.norm())
        return lr * min(1.0, 1.0 / norm) if norm > 0.0 else lr
    if line_search == "strong_wolfe" and f_old is not None:
        # N&W eq. 3.60 with their min(1, 1.01 alpha) for (quasi-)Newton directions, as scipy:
        # expect the same decrease as last time. Near the solution it is > 1, so the unit step
        # (superlinear convergence) is still tried first; earlier it saves evaluations when
        # H is poorly scaled.
        alpha = 1.01 * 2.0 * (f - f_old) / float(g.dot(d))
        if alpha > 0.0 and math.isfinite(alpha):
            return lr * min(1.0, alpha)
    return lr


def _search(
    objective: ClosureObjective,
    line_search: str | None,
    x: Tensor,
    f: float,
    g: Tensor,
    d: Tensor,
    alpha0: float,
    tolerance_change: float,
    needs_graph: bool,
) -> tuple[float, float, Tensor] | None:
    """One step length along ``d`` from the trial ``alpha0``; ``None`` when no step decreases
    the loss."""
    gtd = float(g.dot(d))
    phi = objective.line(x, d, needs_graph)
    if line_search is None:
        # Fixed step, as torch.optim.LBFGS without a line search: accepted unconditionally.
        f_new, _, g_new = phi(alpha0)
        return alpha0, f_new, g_new
    if line_search == "exact_quadratic":
        # alpha = -g'd / d'Ad minimises f along d exactly when f is quadratic (N&W eq. 3.55);
        # one Hessian-vector product at x. Elsewhere it is only a trial step, so it must pass
        # the sufficient-decrease test or the strong-Wolfe search takes over from it.
        curvature = float(d.dot(objective.hessian_vector_product(d, g)))
        if curvature > 0.0 and math.isfinite(curvature):
            alpha = -gtd / curvature
            f_new, _, g_new = phi(alpha)
            if math.isfinite(f_new) and f_new <= f + C1 * alpha * gtd:
                return alpha, f_new, g_new
            alpha0 = alpha
    d_max = float(d.abs().max())
    result = strong_wolfe(
        phi,
        f,
        gtd,
        g,
        alpha0,
        alpha_tolerance=tolerance_change / d_max if d_max > 0 else 0.0,
    )
    if result.alpha == 0.0:
        return None
    objective.move_to(result.alpha)
    return result.alpha, result.loss, result.grad
