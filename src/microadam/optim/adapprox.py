"""Adapprox: Adam's second moment kept as randomized low-rank factors of adaptive rank.

The class is thin (validation, ``defaults``, lazy state, checkpoint handling); the
mathematics lives in module-level functions: :func:`adaptive_low_rank` (randomized subspace
iteration with the rank search) and :func:`adapprox_step_` (one step of one parameter).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from microadam.compress.low_rank import adaptive_low_rank
from microadam.optim import _sharding
from microadam.optim._common import (
    NONFINITE_POLICIES,
    LazyText,
    NonFiniteSteps,
    check_betas,
    check_choice,
    check_flag,
    check_int,
    check_lr,
    check_nonnegative,
    check_number,
    check_positive,
    describe_param,
    lift_format_key,
    load_checked_state_dict,
    params_by_saved_id,
    params_with_grad,
    run_closure,
)

__all__ = [
    "Adapprox",
    "adapprox_step_",
    "matrix_shape",
]

# Defaults of the rank search, chosen by the measurement of docs/adapprox.md (the paper's
# own constants were not available to us).
DEFAULT_MIN_RANK = 1
DEFAULT_MAX_RANK = 32
DEFAULT_RANK_STEP = 4
DEFAULT_RANK_TOLERANCE = 0.1
DEFAULT_POWER_ITERATIONS = 1
DEFAULT_OVERSAMPLING = 0

# Version 2 saves DTensor parameters' state stacked over the shards (_sharding); version 1
# gave it per-shard keys. Plain parameters' state is the same in both, so version-1 dicts
# without per-shard keys still load.
STATE_FORMAT_VERSION = 2
# State keys that live on the CPU whatever the parameter's device.
_CPU_KEYS = ("step", "rng_state")
_FLOORS = ("gradient", "zero")
# The keyword arguments of adapprox_step_ besides lr, read from a param group.
_STEP_ARGUMENTS = (
    "betas",
    "eps",
    "weight_decay",
    "clip_threshold",
    "min_rank",
    "max_rank",
    "rank_step",
    "rank_tolerance",
    "power_iterations",
    "oversampling",
    "second_moment_floor",
    "maximize",
)


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    check_lr(group["lr"])
    check_betas(group["betas"], first_may_be_none=True)
    check_positive("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    clip = group["clip_threshold"]
    if clip is not None:
        check_number("clip_threshold", clip, "None or clip_threshold > 0", lambda c: c > 0.0)
    check_int("min_rank", group["min_rank"], 1)
    min_rank, max_rank = group["min_rank"], group["max_rank"]
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < min_rank:
        raise ValueError(
            f"Invalid max_rank: {max_rank!r} (expected an integer >= min_rank = {min_rank})"
        )
    check_int("rank_step", group["rank_step"], 1)
    check_number(
        "rank_tolerance", group["rank_tolerance"], "0 <= rank_tolerance <= 1", lambda t: 0 <= t <= 1
    )
    check_int("power_iterations", group["power_iterations"], 0)
    check_int("oversampling", group["oversampling"], 0)
    check_choice("second_moment_floor", group["second_moment_floor"], _FLOORS)
    check_flag("maximize", group["maximize"])


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def matrix_shape(param: torch.Tensor) -> tuple[int, int] | None:
    """The ``(m, n)`` matrix whose second moment is factored, or ``None`` for the dense rule.

    A 2-D parameter is its own matrix; a tensor of more dimensions is seen as
    ``(shape[0], prod(shape[1:]))`` (a conv weight ``(out, in, kh, kw)`` becomes
    ``(out, in * kh * kw)``). 0-D and 1-D parameters, and empty tensors, return ``None``.
    """
    if param.dim() < 2 or param.numel() == 0:
        return None
    return param.shape[0], param.numel() // param.shape[0]


def _mul_pow2_(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t *= 2**e`` in place, exactly (up to overflow or underflow), in pieces whose factor
    the dtype can hold; an overflow gives inf (never NaN: every factor is a positive normal
    number)."""
    piece = 100 if t.dtype != torch.float64 else 1000
    while e != 0:
        k = max(-piece, min(piece, e))
        t.mul_(2.0**k)
        e -= k
    return t


def _overflow_shift(g: torch.Tensor, u_prev: torch.Tensor, beta2: float, m: int, n: int) -> int:
    """The ``h >= 0`` for which the factored step is computed on ``g / 2^h`` and the second
    moment on ``V / 4^h``: 0 unless the matrix to factor could overflow its sums.

    Every entry of ``A = beta2 Q U^T + (1 - beta2) g^2`` is at most
    ``B = (1 - beta2) max|g|^2 + beta2 k max|U|`` (``Q`` has orthonormal columns), and AS-RSI
    sums squares of entries (``||A||_F^2``, ``||U||_F^2``), which stay below the dtype's
    maximum if ``m n B^2 <= max / 4``. Bounds are taken in log2, which cannot overflow.
    """
    if g.numel() == 0:
        return 0
    lo, hi = torch.aminmax(g)
    gmax = max(-lo.item(), hi.item())
    terms = []
    if gmax > 0 and beta2 < 1:
        terms.append(2 * math.log2(gmax) + math.log2(1.0 - beta2))
    k = u_prev.shape[1]
    if k > 0 and beta2 > 0 and u_prev.numel() > 0:
        ulo, uhi = torch.aminmax(u_prev)
        umax = max(-ulo.item(), uhi.item())
        if umax > 0:
            terms.append(math.log2(beta2 * k * umax))
    if not terms:
        return 0
    log2_bound = max(terms) + 1.0  # a + b <= 2 max(a, b)
    log2_limit = (math.log2(torch.finfo(g.dtype).max) - 2.0 - math.log2(m * n)) / 2.0
    if log2_bound <= log2_limit:
        return 0
    return math.ceil((log2_bound - log2_limit) / 2.0)


def _direction(
    grad: torch.Tensor, v: torch.Tensor, eps: float, clip_threshold: float | None
) -> torch.Tensor:
    """g / (sqrt(max(v, 0)) + eps), then divided by max(1, RMS / clip_threshold)."""
    d = grad / v.clamp(min=0).sqrt_().add_(eps)
    if clip_threshold is not None:
        rms = torch.linalg.vector_norm(d) / math.sqrt(max(d.numel(), 1))
        d.div_(torch.clamp(rms / clip_threshold, min=1.0))
    return d


def adapprox_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float | None, float],
    eps: float,
    weight_decay: float,
    clip_threshold: float | None,
    min_rank: int,
    max_rank: int,
    rank_step: int,
    rank_tolerance: float,
    power_iterations: int,
    oversampling: int,
    second_moment_floor: str,
    maximize: bool,
) -> None:
    """One Adapprox step of one parameter, in place on ``param`` and ``state``.

    ``state`` must already hold the buffers of :meth:`Adapprox._init_state`; ``grad`` is
    only read. Factored parameters draw their sketches from a generator restored from
    ``state["rng_state"]`` and save its state back afterwards.
    """
    beta1, beta2 = betas
    dtype = _compute_dtype(param)
    shape = matrix_shape(param)
    g = grad.to(dtype, copy=True)  # never alias p.grad: it is read, not written
    if maximize:
        g.neg_()
    if shape is None:
        # Dense rule: v_t = beta2 v_{t-1} + (1 - beta2) g^2, stored exactly (numel elements).
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        d = _direction(g, v, eps, clip_threshold)
        # |g| >= 2^64 (float32) overflows v to inf, which steps that coordinate by
        # g / inf = 0 as torch.optim.Adam does; keep the state finite (a no-op otherwise).
        v.clamp_(max=torch.finfo(dtype).max)
    else:
        m, n = shape
        g = g.reshape(m, n)
        q_prev, u_prev = state["factor_q"], state["factor_u"]
        # Huge gradients: g^2 would overflow, or the factorization's sums of squares would.
        # Then work on g / 2^h and V / 4^h (exact power-of-two scaling, so the direction
        # g / (sqrt(V) + eps) is unchanged); h is 0 for ordinary gradients.
        h = _overflow_shift(g, u_prev, beta2, m, n)
        if h:
            _mul_pow2_(g, -h)
            u_prev = _mul_pow2_(u_prev.clone(), -2 * h)
            eps = eps * 2.0**-h
        # Alg. line 1: V_t = beta2 Q_{t-1} U_{t-1}^T + (1 - beta2) g^2, formed transiently.
        g_sq = torch.mul(g, g).mul_(1.0 - beta2)
        a = g_sq.clone()
        if q_prev.shape[1] > 0:
            a.addmm_(q_prev, u_prev.T, alpha=beta2)
        generator = torch.Generator(device=param.device)
        generator.set_state(state["rng_state"])
        # Alg. line 2: Q_t, U_t = AS-RSI(V_t); only these k (m + n) numbers persist.
        q, u, _ = adaptive_low_rank(
            a,
            min_rank=min_rank,
            max_rank=max_rank,
            rank_step=rank_step,
            rank_tolerance=rank_tolerance,
            power_iterations=power_iterations,
            oversampling=oversampling,
            generator=generator,
        )
        del a
        state["factor_q"] = q.contiguous()
        if h:
            # Back to the true scale; where V itself is beyond the dtype's range, U saturates
            # at its maximum (the next step's V is then smaller than the true one).
            fmax = torch.finfo(u.dtype).max
            state["factor_u"] = _mul_pow2_(u.clone(), 2 * h).clamp_(-fmax, fmax).contiguous()
        else:
            state["factor_u"] = u.contiguous()
        state["rng_state"] = generator.get_state()
        # Alg. line 3: the low-rank V may dip below zero, or below the exact dense V_t's
        # lower bound (1 - beta2) g^2, where the true V_t is small; clamp it there.
        v_hat = q @ u.T
        if second_moment_floor == "gradient":
            torch.maximum(v_hat, g_sq, out=v_hat)
        del g_sq
        d = _direction(g, v_hat, eps, clip_threshold)  # clamps at 0 as well
        del v_hat
        d = d.reshape(param.shape)
    del g
    if beta1 is not None and beta1 > 0:
        # Alg. line 5: the first moment averages the clipped direction (m numel elements).
        exp_avg = state["exp_avg"]
        exp_avg.lerp_(d, 1.0 - beta1)
        d = exp_avg
    # Alg. line 6: decoupled weight decay, then the step.
    work = param if param.dtype == dtype else param.to(dtype)
    if weight_decay != 0:
        work.mul_(1.0 - lr * weight_decay)
    work.add_(d, alpha=-lr)
    if work is not param:
        param.copy_(work)
    state["step"] += 1


class Adapprox(NonFiniteSteps, Optimizer):
    r"""Adapprox: Adam whose second moment is a randomized low-rank matrix of adaptive rank.

    Adapprox (Zhao et al., 2024) keeps, for every matrix parameter, the second moment
    :math:`V_t` only as factors :math:`Q_t U_t^\top` of a rank :math:`k` chosen each step:
    it forms :math:`\beta_2 Q_{t-1} U_{t-1}^\top + (1-\beta_2) g_t^2`, refactors it by
    adaptive streamlined randomized subspace iteration (AS-RSI), divides the gradient by the
    square root of the clamped reconstruction, clips the result by its RMS as Adafactor
    does, and optionally averages it into a first moment. There is no bias correction.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt} \\
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
                \epsilon, \lambda \text{ (weight decay)}, d \text{ (clip\_threshold)},
                \xi \text{ (rank\_tolerance)}, \\
            &\hspace{13mm} k_{min}, k_{max}, \Delta k \text{ (min\_rank, max\_rank,
                rank\_step)}, q \text{ (power\_iterations)} \\
            &\textbf{initialize}: Q_0 U_0^\top \leftarrow 0 \text{ (rank 0)},\;
                m_0 \leftarrow 0 \\
            &\rule{110mm}{0.4pt} \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \quad (-\nabla \text{ if maximize}) \\
            &\hspace{5mm} A_t \leftarrow \beta_2 Q_{t-1} U_{t-1}^\top + (1-\beta_2)\, g_t^2 \\
            &\hspace{5mm} Q \leftarrow [\,] \\
            &\hspace{5mm} \textbf{for} \: k = k_{min}, k_{min} + \Delta k, \ldots, k_{max}
                \: \textbf{do} \\
            &\hspace{10mm} \Omega \sim \mathcal{N}(0, 1)^{n \times (k - |Q|)};\;
                Y \leftarrow \mathrm{orth}_{\perp Q}(A_t \Omega) \\
            &\hspace{10mm} \textbf{repeat } q \textbf{ times}: \;
                Y \leftarrow \mathrm{orth}_{\perp Q}\big(A_t\, \mathrm{qr}(A_t^\top Y)\big) \\
            &\hspace{10mm} Q \leftarrow [Q, Y]; \quad U \leftarrow A_t^\top Q \\
            &\hspace{10mm} \textbf{if} \: \lVert A_t \rVert_F^2 - \lVert U \rVert_F^2
                \le \xi^2 \lVert A_t \rVert_F^2 \: \textbf{break} \\
            &\hspace{5mm} Q_t, U_t \leftarrow Q, U \\
            &\hspace{5mm} \hat V_t \leftarrow \max\big(Q_t U_t^\top, (1-\beta_2)\, g_t^2\big)
                \quad (\max(Q_t U_t^\top, 0) \text{ if floor is "zero"}) \\
            &\hspace{5mm} u_t \leftarrow g_t / (\sqrt{\hat V_t} + \epsilon) \\
            &\hspace{5mm} u_t \leftarrow u_t / \max\big(1, \mathrm{RMS}(u_t) / d\big) \\
            &\hspace{5mm} \textbf{if} \: \beta_1 > 0: \; m_t \leftarrow \beta_1 m_{t-1}
                + (1-\beta_1) u_t, \; u_t \leftarrow m_t \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda) - \gamma u_t \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return} \: \theta_t \\[-1.ex]
            &\rule{110mm}{0.4pt} \\[-1.ex]
       \end{aligned}

    Here :math:`\mathrm{RMS}(x) = \lVert x \rVert_F / \sqrt{\mathrm{numel}(x)}`;
    :math:`\mathrm{orth}_{\perp Q}(Y)` projects :math:`Q`'s span out of :math:`Y` and
    orthonormalizes it by QR (twice, for stability). The ranks tried are
    :math:`k_{min}, k_{min} + \Delta k, \ldots` and finally :math:`k_{max}`, all capped at
    :math:`\min(m, n)`; the basis grows by the difference at each candidate, so the search
    costs about one sketch of the final rank. Because :math:`Q` is orthonormal and
    :math:`U = A_t^\top Q`, :math:`\lVert A_t \rVert_F^2 - \lVert U \rVert_F^2` is exactly
    :math:`\lVert A_t - Q U^\top \rVert_F^2`: the search stops at the first candidate whose
    relative Frobenius error is at most :math:`\xi`, or keeps :math:`k_{max}`. With
    ``oversampling`` :math:`p > 0` each candidate's basis has :math:`k + p` columns and is
    cut back to the best rank :math:`k` by an SVD of the small factor :math:`U`.

    .. note::
        Conventions. ``eps`` is added to :math:`\sqrt{\hat V_t}` outside the square root, as
        in ``torch.optim.Adam``, and must be positive. No bias correction (as in the
        paper); the first moment averages the clipped direction, not the raw gradient;
        weight decay is decoupled (AdamW). ``betas[0]`` of ``None`` or 0 drops the first
        moment, ``clip_threshold=None`` drops the clipping. The recursion runs on the
        unclamped factors (the paper's :math:`\beta_2 Q_{t-1}U_{t-1}^\top`); only the
        :math:`\hat V_t` used in the update is clamped. At ``min_rank = max_rank >=
        min(m, n)`` the factors reproduce :math:`A_t` up to rounding, so Adapprox then equals
        the same rule with an exact dense second moment (the tests check this in float64).

    .. note::
        The floor. A low-rank reconstruction of a non-negative matrix can be negative, or
        near zero, exactly where the true :math:`V_t` is small; :math:`g / \sqrt{\hat V}`
        then explodes there and the RMS clip shrinks the whole update to make room for it.
        ``second_moment_floor="zero"`` only clamps at 0. The default ``"gradient"`` clamps
        at :math:`(1-\beta_2) g_t^2`, a lower bound of the exact dense :math:`V_t` (every
        term of the average is non-negative), so it never moves :math:`\hat V_t` past the
        truth and bounds every entry of :math:`u_t` by :math:`1/\sqrt{1-\beta_2}`. This
        floor is our addition; the public descriptions of the paper do not mention
        clamping. The table below shows why it is the default.

    .. note::
        Shapes. A 2-D parameter of shape :math:`(m, n)` is factored as it is; a parameter
        of more dimensions is factored as the matrix ``(shape[0], prod(shape[1:]))`` (its
        gradient reshaped; a conv weight ``(out, in, kh, kw)`` gives ``(out, in*kh*kw)``).
        0-D and 1-D parameters (biases, norms) keep a dense second moment ``exp_avg_sq``
        with the same rule otherwise (the floor is then a no-op).

    .. note::
        Randomness. Each factored parameter owns a ``torch.Generator`` on its device whose
        state is kept in the state as ``rng_state`` (a CPU uint8 tensor from
        ``Generator.get_state()``), seeded from torch's default generator when the state is
        created, so ``torch.manual_seed`` makes runs repeatable and a resumed checkpoint
        draws the same sketches as the uninterrupted run. :meth:`load_state_dict` keeps
        the generator state's bytes (torch's default would cast it to the parameter's
        floating dtype) and puts the floating buffers in the dtype the parameter computes
        in (float32 for a bf16 parameter, not bf16).

    .. note::
        Choosing the defaults. The paper's AS-RSI constants were not available to us, so
        the defaults come from a measurement on an ill-conditioned MLP regression
        (docs/adapprox.md): with the ``"zero"`` floor, tolerances that pick ranks between 2
        and ~25 blow up (near-zero :math:`\hat V` entries); with the ``"gradient"`` floor
        every setting trains like AdamW, and tolerance 0.1 keeps :math:`V` to 10% relative
        error at about a tenth of the dense second moment's size.

    .. note::
        FSDP2. A DTensor parameter (``fully_shard``, sharded on dim 0) is stepped on its
        local shard: each rank keeps and refactors the second moment of its own rows only
        (``factor_q`` has the local row count, the rank is chosen per shard, and the
        sketches come from per-rank generators), which is not the factorization one process
        would compute for the whole matrix. The non-finite gradient check is agreed over the
        ranks. For ``torch.distributed.checkpoint`` (DCP, ``get_state_dict`` /
        ``set_state_dict``), :meth:`state_dict` presents each per-shard state tensor but
        ``step`` as a DTensor of global shape ``(num_shards, *shape)`` sharded on dim 0 over
        the parameter's mesh (zero-padded to the largest shard, the factors to the largest
        rank a shard can take, with each shard's rank in ``factor_rank``), as MicroAdam
        does, so DCP saves every rank's own state and resuming in the same world size is
        bit-exact. Per-shard state cannot be resharded: loading into another world size,
        or into unsharded parameters, fails in DCP's planner with a size mismatch for the
        parameter's state key (the leading dimension is the number of shards), and in
        :meth:`load_state_dict` with a ``ValueError`` naming the parameter and both shard
        counts. ``torch.save(opt.state_dict())`` on each rank works too. Checkpoints of
        sharded parameters written by microadam before ``adapprox_format`` 2 (per-shard
        keys such as ``factor_q@shard0of2``) are refused with a ``ValueError``; others of
        format 1 load as they are.

    .. note::
        Huge gradients. A non-finite gradient raises ``NonFiniteGradientError`` (a
        ``RuntimeError``) and changes nothing, or with ``nonfinite="skip"`` skips the step
        (a ``RuntimeWarning``; :attr:`skipped_steps` counts it);
        a finite one never makes a parameter or state tensor NaN or inf, up to the float32
        maximum. For a factored parameter, when :math:`(1-\beta_2) g^2` or the sums of
        squares in AS-RSI could overflow (an entry bound :math:`B` of the matrix to factor
        with :math:`mnB^2` above a quarter of the dtype's maximum, so about
        :math:`|g| \ge 2^{32}` for a 1024 x 1024 float32 matrix; never for ordinary
        gradients, whose step is unchanged bit for bit), the step works on
        :math:`g / 2^h` and :math:`V / 4^h` with the smallest :math:`h` that avoids it.
        Scaling by a power of two is exact, so the direction
        :math:`g / (\sqrt{\hat V} + \epsilon)` is the unscaled one up to underflow of
        entries far below the largest. ``factor_u`` is stored at the true scale, saturated
        at the dtype's maximum where :math:`V` itself is beyond it, and later steps keep
        scaling until it has decayed. The dense rule of 0-D and 1-D parameters stores
        :math:`v` exactly: where :math:`g^2` overflows, the coordinate steps by
        :math:`g / \infty = 0` as ``torch.optim.Adam``'s does, and ``exp_avg_sq`` saturates at
        the dtype's maximum instead of holding inf.

    Memory: for an :math:`m \times n` matrix (float32 or lower-precision parameters keep
    float32 state, float64 parameters float64) the persistent state is ``factor_q``
    (:math:`4mk` bytes) and ``factor_u`` (:math:`4nk`), i.e. :math:`4k(m+n)` bytes with
    :math:`k \le` ``max_rank`` the rank chosen at the last step, plus ``exp_avg``
    (:math:`4mn`) when the first moment is on, plus ``step`` (a 4-byte float32 scalar) and
    ``rng_state`` (5056 bytes for a CPU generator, 16 for CUDA). A 0-D or 1-D parameter of
    :math:`d` elements holds ``exp_avg_sq`` (:math:`4d`), ``exp_avg`` (:math:`4d`, with
    the first moment) and ``step``. During ``step`` a factored parameter needs transient
    scratch of a few :math:`m \times n` matrices (the matrix being factored, the gradient
    floor, the reconstruction, the direction); none of it is kept.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        betas (Tuple[float or None, float], optional): :math:`\beta_1` (``None`` or 0
            disables the first moment) and :math:`\beta_2` (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon > 0`, added to :math:`\sqrt{\hat V_t}`
            (default: 1e-8).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0).
        clip_threshold (float or None, optional): :math:`d`, the RMS the direction is
            clipped to; ``None`` disables clipping (default: 1.0).
        min_rank (int, optional): :math:`k_{min}`, first rank tried (default: 1).
        max_rank (int, optional): :math:`k_{max}`, largest rank, capped at
            :math:`\min(m, n)` per matrix (default: 32).
        rank_step (int, optional): :math:`\Delta k`, rank increment of the search
            (default: 4).
        rank_tolerance (float, optional): :math:`\xi`, the relative Frobenius error that
            stops the search, ``0 <= xi <= 1``; 0 always takes ``max_rank``. In float32 the
            error is not resolved much below 1e-3 (default: 0.1).
        power_iterations (int, optional): :math:`q`, subspace iterations after each sketch
            (default: 1).
        oversampling (int, optional): :math:`p`, extra sketch columns, cut back to the rank
            by a small SVD (default: 0).
        second_moment_floor (str, optional): ``"gradient"`` clamps :math:`\hat V_t` at
            :math:`(1-\beta_2) g_t^2`, ``"zero"`` at 0 (default: "gradient").
        maximize (bool, optional): maximize the objective instead (default: False).
        nonfinite (str, optional): what ``step`` does when a gradient holds NaN or inf:
            ``"raise"`` (``NonFiniteGradientError``) or ``"skip"`` the whole step (a
            warning, and :attr:`skipped_steps` counts it); either way nothing is updated
            (default: "raise").

    Example:
        >>> import torch
        >>> from microadam.optim.adapprox import Adapprox
        >>> model = torch.nn.Linear(64, 8)
        >>> opt = Adapprox(model.parameters(), lr=1e-3, max_rank=4)
        >>> loss = model(torch.randn(16, 64)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()
        >>> opt.state[model.weight]["factor_q"].shape[1] <= 4
        True

    References:
        P. Zhao, P. Li, Y. Gu, Y. Zheng, S. L. Kölker, Z. Wang, X. Yuan. "Adapprox:
        Adaptive Approximation in Adam Optimization via Randomized Low-Rank Matrices."
        arXiv:2403.14958, 2024.

        N. Halko, P.-G. Martinsson, J. A. Tropp. "Finding Structure with Randomness:
        Probabilistic Algorithms for Constructing Approximate Matrix Decompositions."
        SIAM Review 53(2), 2011 (randomized range finder, subspace iteration).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | None, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        clip_threshold: float | None = 1.0,
        min_rank: int = DEFAULT_MIN_RANK,
        max_rank: int = DEFAULT_MAX_RANK,
        rank_step: int = DEFAULT_RANK_STEP,
        rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
        oversampling: int = DEFAULT_OVERSAMPLING,
        second_moment_floor: str = "gradient",
        maximize: bool = False,
        nonfinite: str = "raise",
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            min_rank=min_rank,
            max_rank=max_rank,
            rank_step=rank_step,
            rank_tolerance=rank_tolerance,
            power_iterations=power_iterations,
            oversampling=oversampling,
            second_moment_floor=second_moment_floor,
            maximize=maximize,
            nonfinite=nonfinite,
        )
        _validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if isinstance(merged["betas"], list):
            merged["betas"] = tuple(merged["betas"])
        _validate_hyperparameters(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, parameter)
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise RuntimeError(
                    "Adapprox does not support complex parameters; optimize "
                    "torch.view_as_real(param) as a real parameter instead"
                )
        super().add_param_group({**param_group, "params": params})

    # -- state -------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        lp = _sharding.local(p)  # a DTensor (FSDP2) keeps the state of its local shard
        dtype, dev = _compute_dtype(lp), lp.device
        shape = matrix_shape(lp)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if shape is None:
                state["exp_avg_sq"] = torch.zeros(lp.shape, dtype=dtype, device=dev)
            else:
                m, n = shape
                # Rank 0 at the start: V_0 = 0 costs nothing.
                state["factor_q"] = torch.zeros((m, 0), dtype=dtype, device=dev)
                state["factor_u"] = torch.zeros((n, 0), dtype=dtype, device=dev)
                seed = int(torch.randint(0, 2**62, (1,)).item())
                generator = torch.Generator(device=dev)
                generator.manual_seed(seed)
                state["rng_state"] = generator.get_state()
        beta1 = group["betas"][0]
        if beta1 is not None and beta1 > 0 and "exp_avg" not in state:
            # Lazily, so that a first moment switched on later starts from zero.
            state["exp_avg"] = torch.zeros(lp.shape, dtype=dtype, device=dev)
        self._check_state(p, state, "the current parameters")
        return state

    def _check_state(self, p: torch.Tensor, state: dict, origin: str) -> None:
        """Raise ``RuntimeError`` if ``state`` does not fit parameter ``p`` (its local
        shard for a DTensor)."""
        where = LazyText(lambda: self._describe(p))
        lp = _sharding.local(p)
        shape = matrix_shape(lp)
        if shape is None:
            expected = {"exp_avg_sq": tuple(lp.shape)}
        else:
            m, n = shape
            expected = {"factor_q": (m, None), "factor_u": (n, None), "rng_state": (None,)}
        if "exp_avg" in state:
            expected["exp_avg"] = tuple(lp.shape)
        for key, want in expected.items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                raise RuntimeError(f"Adapprox state of {where} has no tensor {key!r} ({origin})")
            got = tuple(value.shape)
            if len(got) != len(want) or any(
                w is not None and g != w for g, w in zip(got, want, strict=True)
            ):
                raise RuntimeError(
                    f"Adapprox state of {where}: {key} has shape {got}, which does not fit "
                    f"the parameter ({origin})"
                )
        if shape is not None:
            if state["factor_q"].shape[1] != state["factor_u"].shape[1]:
                raise RuntimeError(
                    f"Adapprox state of {where}: factor_q and factor_u have different ranks "
                    f"({state['factor_q'].shape[1]} and {state['factor_u'].shape[1]})"
                )
            if state["rng_state"].dtype != torch.uint8:
                raise RuntimeError(
                    f"Adapprox state of {where}: rng_state has dtype "
                    f"{state['rng_state'].dtype}, expected torch.uint8 ({origin})"
                )

    def _describe(self, p: torch.Tensor) -> str:
        return describe_param(self.param_groups, p)

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns
                the loss.
        """
        loss = run_closure(closure)
        # Check every gradient before touching anything, so a bad one changes nothing.
        # A DTensor parameter (FSDP2) steps on its local shard (to_local() views the local
        # storage, so the update lands in the parameter) and factors the local rows only.
        work = params_with_grad("Adapprox", self.param_groups)
        if not self._gradients_finite("Adapprox", [p for _, p in work], self._describe):
            return loss  # skipped (nonfinite="skip")
        states = [self._init_state(p, group) for group, p in work]

        for (group, p), state in zip(work, states, strict=True):
            lr = group["lr"]
            hyper = {key: group[key] for key in _STEP_ARGUMENTS}
            hyper["lr"] = lr.item() if isinstance(lr, torch.Tensor) else lr
            adapprox_step_(_sharding.local(p), _sharding.local(p.grad), state, **hyper)
        return loss

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state dict, with ``adapprox_format`` (the layout version) at the top level.

        Plain parameters' state is as in ``torch.optim``. The state of a DTensor parameter
        (FSDP2) is per shard; each of its tensors but ``step`` comes as a DTensor of global
        shape ``(num_shards, *largest_shard_shape)`` sharded on dim 0 over the parameter's
        mesh, as MicroAdam's does (see :mod:`microadam.optim._sharding`), so that
        ``torch.distributed.checkpoint`` (DCP) saves and loads every rank's own state.
        ``factor_q`` and ``factor_u`` are zero-padded to the largest rank any shard can
        take (``min(max_rank, m, n)`` of the largest shard's matrix) and each shard's
        chosen rank is saved as ``factor_rank`` (int64, global shape ``(num_shards,)``),
        so that the shapes do not depend on the adaptive rank (DCP loads into the shapes of
        a fresh optimizer's state). ``rng_state`` is stacked as well (each rank's generator
        is its own; its length is the same on every rank of a mesh, whose parameters share
        a device type). ``adapprox_format`` is also copied into every param group
        (``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and
        ``param_groups``, also for unsharded models such as DDP's).
        """
        sd = super().state_dict()
        sd["adapprox_format"] = STATE_FORMAT_VERSION
        sd["param_groups"] = [
            {**g, "adapprox_format": STATE_FORMAT_VERSION} for g in sd["param_groups"]
        ]
        ids = params_by_saved_id(self.param_groups, sd["param_groups"])
        _sharding.shard_states(sd["state"], ids, self._checkpoint_layout, self._describe)
        return sd

    # DTensor parameters in checkpoints: the stacked scheme of _sharding, with the factors
    # padded to the largest rank. A factored parameter with empty shards (fewer rows than
    # ranks) has two layouts: an empty shard keeps the dense rule's exp_avg_sq, the others
    # factors. DCP needs every rank to save the same keys, so each saves the other
    # layout's keys with no elements (zero-padded to the largest shard), dropped on load.
    _DENSE_KEYS = ("exp_avg_sq",)
    _FACTOR_KEYS = ("factor_q", "factor_u", "factor_rank", "rng_state")

    def _mixed_layout(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether DTensor ``p`` is factored but some of its shards are empty."""
        return self._largest_factors(p, group) is not None and any(
            0 in shape for shape in _sharding.shard_shapes(p)
        )

    @staticmethod
    def _other_layout(p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The keys of the layout that DTensor ``p``'s shard does not have, with no elements
        (``factor_rank`` follows from ``factor_q``)."""
        lp = _sharding.local(p)
        dtype, dev = _compute_dtype(lp), lp.device
        if matrix_shape(lp) is not None:
            return {"exp_avg_sq": torch.zeros((0,) * lp.dim(), dtype=dtype, device=dev)}
        length = torch.Generator(device=dev).get_state().numel()
        return {
            "factor_q": torch.zeros((0, 0), dtype=dtype, device=dev),
            "factor_u": torch.zeros((0, 0), dtype=dtype, device=dev),
            "rng_state": torch.zeros(length, dtype=torch.uint8),
        }

    @staticmethod
    def _largest_factors(p: torch.Tensor, group: dict[str, Any]) -> tuple[int, int, int] | None:
        """``(m, n, top)`` of DTensor ``p``'s largest shard: its matrix and the largest rank
        a shard's factors can have; None for the dense rule (or settings the load checks
        refuse)."""
        biggest = matrix_shape(torch.empty(_sharding.max_local_shape(p), device="meta"))
        max_rank = group.get("max_rank")
        if biggest is None or isinstance(max_rank, bool) or not isinstance(max_rank, int):
            return None
        m, n = biggest
        return m, n, min(max_rank, m, n)

    def _checkpoint_layout(
        self, p: torch.Tensor, group: dict[str, Any], state: dict
    ) -> tuple[dict, dict[str, tuple[int, ...]]]:
        """The state of DTensor ``p`` to save (with ``factor_rank``) and the largest shard's
        shape of each key, the same on every rank."""
        if self._mixed_layout(p, group):
            state = {**self._other_layout(p), **state}
        biggest = _sharding.max_local_shape(p)
        shapes: dict[str, tuple[int, ...]] = {"exp_avg": biggest, "exp_avg_sq": biggest}
        factors = self._largest_factors(p, group)
        q, rng = state.get("factor_q"), state.get("rng_state")
        if factors is not None and isinstance(q, torch.Tensor) and q.dim() == 2:
            m, n, top = factors
            k = q.shape[1]
            if k > top:
                raise RuntimeError(
                    f"Adapprox state of {self._describe(p)}: factor_q has rank {k}, above "
                    f"{top}, the largest its param group's max_rank allows; step once with "
                    "the new max_rank before saving"
                )
            shapes |= {"factor_q": (m, top), "factor_u": (n, top), "factor_rank": ()}
            state = {**state, "factor_rank": torch.tensor(k, dtype=torch.int64)}
        if isinstance(rng, torch.Tensor):
            shapes["rng_state"] = tuple(rng.shape)
        return state, shapes

    def _local_state_for_load(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the layout version at the top level (also when DCP dropped
        it), without the per-group copies, with a version-1 dict taken as version 2 (the
        layout differs only for DTensor parameters, whose version-1 state is refused), and
        with the stacked state of DTensor parameters back as this rank's plain tensors;
        ``ValueError`` when saved for another sharding."""
        state_dict = lift_format_key(state_dict, "adapprox_format")
        state = state_dict.get("state")
        if not isinstance(state, dict) or not isinstance(state_dict.get("param_groups"), list):
            return state_dict
        saved_version = state_dict.get("adapprox_format")
        if type(saved_version) is int and saved_version == 1:
            self._refuse_version_1_shards(state)
            state_dict = {**state_dict, "adapprox_format": STATE_FORMAT_VERSION}
        ids = params_by_saved_id(self.param_groups, state_dict["param_groups"])
        sharded = {
            pid: (p, group)
            for pid, (p, group) in ids.items()
            if _sharding.is_dtensor(p) and isinstance(state.get(pid), dict)
        }
        state = {**state}
        for pid, (p, group) in sharded.items():
            if self._mixed_layout(p, group):  # drop the other layout's keys
                factored = matrix_shape(_sharding.local(p)) is not None
                drop = self._DENSE_KEYS if factored else self._FACTOR_KEYS
                state[pid] = {k: v for k, v in state[pid].items() if k not in drop}
        state = _sharding.local_states(state, ids, self._local_shapes, self._describe)
        for pid, (p, _) in sharded.items():
            state[pid] = self._unpad_factors(p, state[pid])
        return {**state_dict, "state": state}

    @staticmethod
    def _refuse_version_1_shards(state: dict[Any, Any]) -> None:
        """``ValueError`` if ``state`` (of a version-1 state dict) holds the per-shard keys that
        version 1 gave DTensor parameters (``factor_q@shard0of2``); its other entries have the
        layout of version 2."""
        for saved in state.values():
            for key in saved if isinstance(saved, dict) else ():
                if isinstance(key, str) and re.fullmatch(r".+@shard\d+of\d+", key):
                    raise ValueError(
                        f"Invalid state_dict: it has the per-shard key {key!r}, so it was written "
                        "by an older microadam (adapprox_format 1) with another sharded layout; "
                        "this version saves the state of DTensor (FSDP2) parameters as DTensors "
                        f"stacked over the shards (adapprox_format {STATE_FORMAT_VERSION}) and "
                        "cannot read it. Load it with the microadam version that wrote it, or "
                        "start the optimizer state afresh"
                    )

    def _local_shapes(
        self, p: torch.Tensor, group: dict[str, Any], saved: dict
    ) -> dict[str, tuple[int, ...]]:
        """This rank's shape of each stacked key of DTensor ``p``'s saved state (the factors
        still padded to the largest rank)."""
        lp = _sharding.local(p)
        shapes = {"exp_avg": tuple(lp.shape), "exp_avg_sq": tuple(lp.shape), "factor_rank": ()}
        local, factors = matrix_shape(lp), self._largest_factors(p, group)
        if local is not None and factors is not None:
            shapes["factor_q"] = (local[0], factors[2])
            shapes["factor_u"] = (local[1], factors[2])
        rng = saved.get("rng_state")
        if isinstance(rng, torch.Tensor) and rng.dim() >= 1:
            shapes["rng_state"] = tuple(rng.shape[1:])  # whatever length was saved
        return shapes

    def _unpad_factors(self, p: torch.Tensor, saved: dict) -> dict:
        """``saved`` (this rank's state of DTensor ``p``) with the factors cut back to the
        saved ``factor_rank``, which is dropped."""
        if "factor_rank" not in saved:
            return saved
        out = dict(saved)
        rank = out.pop("factor_rank")
        where = LazyText(lambda: self._describe(p))
        if (
            not isinstance(rank, torch.Tensor)
            or rank.numel() != 1
            or rank.dtype.is_floating_point
            or rank.dtype.is_complex
        ):
            raise ValueError(
                f"Invalid state_dict: factor_rank of {where} is not a one-element integer tensor"
            )
        k = int(rank)
        for key in ("factor_q", "factor_u"):
            v = out.get(key)
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                if not 0 <= k <= v.shape[1]:
                    raise ValueError(
                        f"Invalid state_dict: factor_rank {k} of {where} does not fit "
                        f"{key} of shape {tuple(v.shape)}"
                    )
                out[key] = v[:, :k]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`.

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating
        parameter to the parameter's dtype and device: the uint8 generator state would
        become floats (and ``Generator.set_state`` wants a CPU uint8 tensor), and the
        float32 factors of a bf16 parameter would lose precision. Here ``step`` and
        ``rng_state`` come back as saved, on the CPU, and the floating buffers in the dtype
        the parameter computes in (float64 for float64 parameters, float32 otherwise), on
        its device, so a checkpoint moves between float32, bf16 and float64 parameters.
        The state is checked against the parameters first; on a mismatch a ``ValueError``
        says what differs and the optimizer is left as it was. Load hooks run as in
        ``torch.optim``, and a ``step`` saved as a Python number is taken as torch.optim
        takes it (:func:`~microadam.optim._common.load_checked_state_dict`).
        """

        def check_group(group: dict, merged: dict, index: int) -> None:
            if isinstance(merged["betas"], list):
                merged["betas"] = tuple(merged["betas"])
            _validate_hyperparameters(merged)

        def check_state(p: torch.Tensor, merged: dict, saved: dict) -> None:
            self._check_state(p, saved, "in the state dict")

        def restore(p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
            # A private copy, so the loaded optimizer never shares buffers with the caller's
            # dict. Floating buffers in the dtype this parameter computes in, as a fresh
            # state would have them (a float32 checkpoint continues in float64 parameters
            # and back); step and the generator state as saved, on the CPU.
            if key in _CPU_KEYS:
                return value.detach().to(device="cpu", copy=True)
            lp = _sharding.local(p)
            dtype = _compute_dtype(lp) if value.is_floating_point() else value.dtype
            return value.detach().to(device=lp.device, dtype=dtype, copy=True)

        load_checked_state_dict(
            self,
            state_dict,
            check_group=check_group,
            check_state=check_state,
            restore=restore,
            prepare=self._local_state_for_load,  # DTensor params, DCP dicts
            format_key="adapprox_format",
            version=STATE_FORMAT_VERSION,
            name="Adapprox",
        )
        for group in self.param_groups:
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])
