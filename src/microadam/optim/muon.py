"""Muon for hidden weight matrices, with an AdamW fallback for every other parameter.

One optimizer object, two kinds of param groups: a group with ``use_muon=True`` holds 2-D
hidden-layer matrices and takes ``torch.optim.Muon``'s update (momentum, Newton-Schulz
orthogonalization, shape-dependent learning rate, decoupled weight decay); a group with
``use_muon=False`` takes ``torch.optim.AdamW``'s update. :func:`muon_param_groups` splits a
model into the two. The mathematics lives in the module-level functions
:func:`zeropower_via_newtonschulz`, :func:`muon_update_` and :func:`adamw_update_`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from microadam.optim._common import (
    NONFINITE_POLICIES,
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
    is_real_number,
    load_checked_state_dict,
    params_with_grad,
    run_closure,
)

__all__ = [
    "DEFAULT_A",
    "DEFAULT_B",
    "DEFAULT_C",
    "DEFAULT_HEAD_NAMES",
    "DEFAULT_NS_STEPS",
    "EPS",
    "Muon",
    "adamw_update_",
    "adjust_lr",
    "muon_param_groups",
    "muon_update_",
    "zeropower_via_newtonschulz",
]

# Constants from Keller Jordan's Muon post: https://kellerjordan.github.io/posts/muon/
# github permalink: https://github.com/KellerJordan/Muon/blob/f90a42b28e00b8d9d2d05865fe90d9f39abcbcbd/muon.py#L16
# (the same values and names as torch/optim/_muon.py).
EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5

# Dotted-name components that mark an output head for muon_param_groups (exact match).
DEFAULT_HEAD_NAMES = ("lm_head", "head", "heads", "classifier")
# A dotted-name component containing this substring marks an embedding-like parameter
# (embed_tokens, word_embeddings, pos_embed, minGPT's tok_emb and pos_emb).
_EMBEDDING_SUBSTRING = "emb"

_ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Hyperparameters that only one kind of group understands; setting one on a group of the
# other kind is a mistake (TypeError), never silently ignored.
_MUON_ONLY_KEYS = (
    "momentum",
    "nesterov",
    "ns_coefficients",
    "ns_steps",
    "adjust_lr_fn",
    "ns_dtype",
)
_ADAMW_ONLY_KEYS = ("betas",)
# Constructor defaults of the AdamW groups, stored in ``defaults`` under these names and
# copied into each AdamW group as the group's own lr, betas, eps and weight_decay.
_ADAMW_DEFAULT_KEYS = {
    "lr": "adamw_lr",
    "betas": "adamw_betas",
    "eps": "adamw_eps",
    "weight_decay": "adamw_weight_decay",
}


# -- the mathematics --------------------------------------------------------------------


def zeropower_via_newtonschulz(
    G: torch.Tensor,
    steps: int = DEFAULT_NS_STEPS,
    coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
    eps: float = EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    r"""Approximate the orthogonal factor :math:`UV^\top` of a matrix ``G = U S V^T``.

    Runs ``steps`` iterations of the odd polynomial
    :math:`X \leftarrow aX + (bA + cA^2)X` with :math:`A = XX^\top` on
    :math:`X_0 = G / \max(\lVert G\rVert_F, \varepsilon)` (the Frobenius norm bounds the
    spectral norm, so every singular value starts in :math:`[0, 1]`). A tall matrix is
    transposed first so that the Gram matrix :math:`A` is the smaller of the two, and back
    at the end. All arithmetic happens in ``dtype`` (bf16 by default, as
    ``torch.optim.Muon``); the result has ``dtype`` and ``G``'s shape. ``G`` is only read.

    With the default quintic coefficients (chosen for a steep slope at zero, not for
    convergence) five steps map the singular values into roughly :math:`[0.68, 1.14]`
    rather than onto 1 (those that start below about :math:`10^{-3}` after normalization,
    as in nearly singular matrices, stay below the band); with the classic cubic
    coefficients ``(1.5, -0.5, 0.0)`` and enough steps the result converges to
    :math:`UV^\top`.

    Args:
        G: a 2-D tensor.
        steps: number of iterations, an integer >= 0 (default: 5).
        coefficients: :math:`(a, b, c)` (default: (3.4445, -4.7750, 2.0315)).
        eps: lower clamp of the Frobenius norm, so a zero matrix maps to zero (default: 1e-7).
        dtype: compute and result dtype (default: torch.bfloat16).
    """
    if G.ndim != 2:
        raise ValueError(f"Invalid G: a tensor of shape {tuple(G.shape)} (expected a 2-D matrix)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"Invalid steps: {steps} (expected an integer >= 0)")
    if len(coefficients) != 3:
        raise ValueError(f"Invalid coefficients: {coefficients} (expected three floats)")
    a, b, c = coefficients
    tall = G.size(0) > G.size(1)
    # A private copy in the compute dtype: G (often the momentum buffer) is never written.
    X = G.to(dtype=dtype, copy=True)
    if tall:
        X = X.T
    X.div_(X.norm().clamp(min=eps))
    for _ in range(steps):
        A = X @ X.T  # Gram matrix: min(m, n)^2 elements of scratch
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size | tuple[int, ...]) -> float:
    r"""The learning rate Muon applies to an ``A x B`` matrix, as ``torch.optim.Muon``.

    ``None`` or ``"original"`` (Keller Jordan): :math:`\gamma\sqrt{\max(1, A/B)}`;
    ``"match_rms_adamw"`` (Liu et al., 2025): :math:`0.2\,\gamma\sqrt{\max(A, B)}`, which
    gives the update the RMS of a typical AdamW update so AdamW's lr and weight decay carry
    over.
    """
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(
        f"Invalid adjust_lr_fn: {adjust_lr_fn!r} (expected None, 'original' or 'match_rms_adamw')"
    )


def muon_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    ns_dtype: torch.dtype,
) -> None:
    """One Muon step of one 2-D parameter, in place on ``param`` and ``momentum_buffer``.

    The same operations, in the same order, as ``torch.optim.Muon`` (read in torch 2.13), so that
    at ``ns_dtype=torch.bfloat16`` the two agree. ``grad`` is only read.
    """
    # B <- mu B + (1 - mu) g: an exponential average (torch and Keller Jordan use lerp).
    momentum_buffer.lerp_(grad, 1 - momentum)
    # Nesterov: (1 - mu) g + mu B, a fresh tensor; otherwise the buffer itself, which
    # zeropower_via_newtonschulz only reads (it copies into ns_dtype first).
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    ortho = zeropower_via_newtonschulz(update, ns_steps, ns_coefficients, eps, ns_dtype)
    # Decoupled weight decay with the unadjusted lr, then the step with the adjusted lr.
    param.mul_(1 - lr * weight_decay)
    param.add_(ortho, alpha=-adjust_lr(lr, adjust_lr_fn, param.shape))


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of one parameter, in place on ``param`` and the state tensors.

    The same operations, in the same order, as the single-tensor path of
    ``torch.optim.AdamW`` (``foreach=False``, the CPU default), so that the two agree to
    the bit. ``grad`` is only read; ``step`` is a 0-d tensor incremented here.
    """
    beta1, beta2 = betas
    step += 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = step.item()
    bias_correction1 = 1 - beta1**t
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


# -- validation ---------------------------------------------------------------------------


def _validate_group(group: Mapping[str, Any]) -> None:
    """Check the hyperparameters of one complete (defaults filled in) param group."""
    check_flag("use_muon", group["use_muon"])
    check_lr(group["lr"])
    check_nonnegative("weight_decay", group["weight_decay"])
    if not group["use_muon"]:
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        return
    # eps > 0: it clamps the norm of a zero update, which would otherwise give 0 / 0.
    check_positive("eps", group["eps"])
    check_number("momentum", group["momentum"], "0 <= momentum < 1", lambda m: 0 <= m < 1)
    check_flag("nesterov", group["nesterov"])
    coefficients = group["ns_coefficients"]
    if (
        not isinstance(coefficients, tuple | list)
        or len(coefficients) != 3
        or not all(is_real_number(x) for x in coefficients)
    ):
        raise ValueError(
            f"Invalid ns_coefficients: {coefficients!r} (expected a tuple of three floats)"
        )
    check_int("ns_steps", group["ns_steps"], 1)
    if group["adjust_lr_fn"] not in _ADJUST_LR_FNS:
        raise ValueError(
            f"Invalid adjust_lr_fn: {group['adjust_lr_fn']!r} "
            "(expected None, 'original' or 'match_rms_adamw')"
        )
    if group["ns_dtype"] not in _NS_DTYPES:
        raise ValueError(
            f"Invalid ns_dtype: {group['ns_dtype']!r} (expected torch.bfloat16, torch.float16, "
            "torch.float32 or torch.float64)"
        )


def _check_params(group: Mapping[str, Any], index: int) -> None:
    for p in group["params"]:
        if p.is_complex():
            raise RuntimeError(
                "Muon does not support complex parameters; optimize "
                "torch.view_as_real(param) as a real parameter instead"
            )
        if group["use_muon"] and p.ndim != 2:
            raise ValueError(
                f"Invalid parameter in param group {index}: Muon groups (use_muon=True) hold "
                f"only 2-D parameters, found one of shape {tuple(p.shape)}; put it in a "
                "use_muon=False (AdamW) group, e.g. with muon_param_groups(model)"
            )


# -- the optimizer ------------------------------------------------------------------------


class Muon(NonFiniteSteps, Optimizer):
    r"""Muon for 2-D hidden-layer matrices and AdamW for all other parameters, in one optimizer.

    Every param group carries a flag ``use_muon``. A Muon group (``use_muon=True``, the
    default) holds 2-D matrices and takes exactly ``torch.optim.Muon``'s update: a momentum
    buffer, optionally Nesterov, orthogonalized by a Newton-Schulz iteration, scaled by a
    shape-dependent learning rate, with decoupled weight decay. An AdamW group
    (``use_muon=False``) takes exactly ``torch.optim.AdamW``'s update. Embeddings, the
    output head, biases, norm gains and every non-2-D tensor belong in an AdamW group;
    :func:`muon_param_groups` builds the two groups from a model.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt} \\
            &\textbf{Muon group input}: \gamma \text{ (lr)}, \lambda \text{ (weight decay)},
                \mu \text{ (momentum)}, \textit{nesterov}, (a, b, c)
                \text{ (ns\_coefficients)}, k \text{ (ns\_steps)}, \varepsilon \text{ (eps)} \\
            &\textbf{AdamW group input}: \gamma \text{ (lr)}, \beta_1, \beta_2
                \text{ (betas)}, \epsilon \text{ (eps)}, \lambda \text{ (weight decay)} \\
            &\textbf{initialize}: B_0 \leftarrow 0 \text{ (momentum buffer)},\;
                m_0 \leftarrow 0, \; v_0 \leftarrow 0 \\
            &\rule{110mm}{0.4pt} \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
            &\hspace{5mm} \textbf{if} \: \textit{use\_muon}
                \quad (\theta \in \mathbb{R}^{A \times B}) \\
            &\hspace{10mm} B_t \leftarrow \mu B_{t-1} + (1 - \mu) g_t \\
            &\hspace{10mm} \widetilde{B}_t \leftarrow (1 - \mu) g_t + \mu B_t
                \text{ if nesterov, else } B_t \\
            &\hspace{10mm} X \leftarrow \widetilde{B}_t \,/\,
                \max(\lVert \widetilde{B}_t \rVert_F, \varepsilon)
                \quad (\text{transposed if } A > B) \\
            &\hspace{10mm} \textbf{repeat} \: k \: \textbf{times}: \;
                X \leftarrow aX + (bXX^\top + c(XX^\top)^2)X \\
            &\hspace{10mm} O_t \leftarrow X \quad (\text{transposed back}) \\
            &\hspace{10mm} \theta_t \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                - \mathrm{AdjustLR}(\gamma; A, B)\, O_t \\
            &\hspace{5mm} \textbf{else} \\
            &\hspace{10mm} \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
            &\hspace{10mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            &\hspace{10mm} \theta_t \leftarrow \theta_{t-1} - \gamma\,
                \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return} \: \theta_t \\[-1.ex]
            &\rule{110mm}{0.4pt} \\[-1.ex]
       \end{aligned}

    with :math:`\mathrm{AdjustLR}(\gamma; A, B) = \gamma\sqrt{\max(1, A/B)}` for
    ``adjust_lr_fn=None`` or ``"original"`` (Keller Jordan) and
    :math:`0.2\,\gamma\sqrt{\max(A, B)}` for ``"match_rms_adamw"`` (Liu et al., 2025).

    .. note::
        Conventions of the Muon groups, all as ``torch.optim.Muon`` (and Keller Jordan's
        code). The momentum buffer is an exponential average, :math:`B_t = \mu B_{t-1} +
        (1-\mu) g_t` (torch's docstring writes :math:`\mu B_{t-1} + g_t`; its code uses
        ``lerp``, as here; the factor :math:`1-\mu` cancels in the normalization except
        against ``eps``). Newton-Schulz runs in ``ns_dtype`` (bf16 by default, as torch;
        ``torch.float32``/``torch.float64`` make it exact enough to compare against a
        reference) and its bf16 result is added to the parameter in the parameter's dtype.
        Weight decay is decoupled and uses the *unadjusted* lr: :math:`\theta \leftarrow
        \theta(1-\gamma\lambda)` first, then the step with :math:`\mathrm{AdjustLR}(\gamma)`.
        With the default quintic coefficients the singular values of :math:`O_t` land in
        roughly :math:`[0.68, 1.14]`, not exactly on 1. ``p.grad`` is never written (Keller
        Jordan's reference updates the gradient in place; this class does not).

    .. note::
        Conventions of the AdamW groups, all as ``torch.optim.AdamW``: ``eps`` is added to
        :math:`\sqrt{\hat v}` outside the square root, the bias corrections use the
        parameter's own step count, and weight decay is decoupled (applied before the
        moments). With ``foreach=False`` (torch's CPU default) the two agree to the bit.

    .. note::
        Defaults. Muon groups: ``lr=0.02``, ``weight_decay=0``, ``momentum=0.95``,
        Nesterov, 5 quintic steps, ``adjust_lr_fn=None`` ("original"): Keller Jordan's
        settings, tuned for the "original" scaling (torch's own defaults, ``lr=1e-3`` and
        ``weight_decay=0.1``, suit ``"match_rms_adamw"``, where the Muon lr is an AdamW-like
        lr). AdamW groups: ``adamw_lr=3e-4``, ``adamw_betas=(0.9, 0.95)``,
        ``adamw_eps=1e-8``, ``adamw_weight_decay=0``, the auxiliary Adam of Keller Jordan's
        ``MuonWithAuxAdam`` with torch's eps. A group dict sets its own values with the plain
        names (``{"params": ..., "use_muon": False, "lr": 1e-3, "betas": (0.9, 0.99)}``);
        the ``adamw_*`` arguments only fill in what an AdamW group leaves out. Setting a
        hyperparameter of the other kind on a group (``betas`` on a Muon group,
        ``momentum`` on an AdamW group) is a ``TypeError``.

    Memory: a Muon group keeps one momentum buffer in the parameter's dtype, 4 bytes per
    parameter in float32 (2 in bf16); an AdamW group keeps ``exp_avg`` and ``exp_avg_sq``,
    8 bytes per parameter in float32, plus a 4-byte step per tensor. A Muon step also needs
    scratch of a few copies of the matrix and one :math:`\min(A, B)^2` Gram matrix in
    ``ns_dtype``.

    Args:
        params: iterable of parameters (one Muon group) or of dicts defining parameter
            groups, each with ``use_muon`` (default: True); see :func:`muon_param_groups`.
        lr (float or Tensor, optional): Muon learning rate :math:`\gamma` (default: 0.02).
        weight_decay (float, optional): Muon decoupled weight decay :math:`\lambda`
            (default: 0).
        momentum (float, optional): :math:`\mu`, ``0 <= momentum < 1`` (default: 0.95).
        nesterov (bool, optional): use Nesterov momentum (default: True).
        ns_coefficients (Tuple[float, float, float], optional): :math:`(a, b, c)` of the
            Newton-Schulz polynomial (default: (3.4445, -4.7750, 2.0315)).
        eps (float, optional): :math:`\varepsilon > 0`, lower clamp of the Frobenius norm in
            Newton-Schulz (default: 1e-7).
        ns_steps (int, optional): :math:`k`, Newton-Schulz iterations, >= 1 (default: 5).
        adjust_lr_fn (str, optional): ``None``/``"original"`` or ``"match_rms_adamw"``
            (default: None).
        ns_dtype (torch.dtype, optional): compute dtype of Newton-Schulz: torch.bfloat16,
            torch.float16, torch.float32 or torch.float64 (default: torch.bfloat16).
        adamw_lr (float or Tensor, optional): lr of AdamW groups that set none
            (default: 3e-4).
        adamw_betas (Tuple[float, float], optional): betas of AdamW groups that set none
            (default: (0.9, 0.95)).
        adamw_eps (float, optional): eps of AdamW groups that set none (default: 1e-8).
        adamw_weight_decay (float, optional): decoupled weight decay of AdamW groups that set
            none (default: 0).
        nonfinite (str, optional): what ``step`` does when a gradient holds NaN or inf:
            ``"raise"`` (``NonFiniteGradientError``, nothing is updated) or ``"skip"`` the
            whole step: nothing is updated, a ``RuntimeWarning`` names the parameter and
            :attr:`skipped_steps` (saved in the state dict) counts it (default: "raise").

    Example:
        >>> import torch
        >>> from microadam.optim.muon import Muon, muon_param_groups
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
        ...     torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> opt = Muon(muon_param_groups(model), lr=0.02, adamw_lr=3e-4)
        >>> [len(g["params"]) for g in opt.param_groups]  # two hidden weights; the rest
        [2, 4]
        >>> loss = model(torch.randn(8, 16)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()

    References:
        K. Jordan, Y. Jin, V. Boza, J. You, F. Cesista, L. Newhouse, J. Bernstein. "Muon:
        An optimizer for hidden layers in neural networks." Blog post, 2024.
        https://kellerjordan.github.io/posts/muon/

        J. Liu, J. Su, X. Yao, Z. Jiang, G. Lai, Y. Du, et al. "Muon is Scalable for LLM
        Training." 2025. arXiv:2502.16982 (the ``"match_rms_adamw"`` scaling).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_lr: float | torch.Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite: str = "raise",
    ) -> None:
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(
            use_muon=True,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=_as_tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            adamw_lr=adamw_lr,
            adamw_betas=_as_tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            nonfinite=nonfinite,
        )
        _validate_group(defaults)
        check_lr(adamw_lr, "adamw_lr")
        check_betas(adamw_betas, "adamw_betas")
        check_nonnegative("adamw_eps", adamw_eps)
        check_nonnegative("adamw_weight_decay", adamw_weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        group = dict(param_group)  # never mutate the caller's dict
        use_muon = group.get("use_muon", self.defaults["use_muon"])
        check_flag("use_muon", use_muon)
        misplaced = [k for k in group if k in _ADAMW_DEFAULT_KEYS.values()]
        misplaced += [k for k in group if k in (_ADAMW_ONLY_KEYS if use_muon else _MUON_ONLY_KEYS)]
        if misplaced:
            kind = "a Muon group (use_muon=True)" if use_muon else "an AdamW group (use_muon=False)"
            raise TypeError(
                f"{kind} does not take {', '.join(map(repr, misplaced))}; an AdamW group sets "
                "lr, betas, eps and weight_decay, a Muon group lr, weight_decay, momentum, "
                "nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn and ns_dtype"
            )
        group["use_muon"] = use_muon
        if not use_muon:
            for key, default_key in _ADAMW_DEFAULT_KEYS.items():
                group.setdefault(key, self.defaults[default_key])
        for key in ("betas", "ns_coefficients"):
            if key in group:
                group[key] = _as_tuple(group[key])
        super().add_param_group(group)  # normalizes params, fills in the Muon defaults
        added = self.param_groups[-1]
        # Keep each group to its own kind's hyperparameters (torch copied every default).
        for key in (*_ADAMW_DEFAULT_KEYS.values(), *(() if use_muon else _MUON_ONLY_KEYS)):
            added.pop(key, None)
        try:
            _validate_group(added)
            _check_params(added, len(self.param_groups) - 1)
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns
                the loss.
        """
        return self._muon_step(closure)[0]

    def _muon_step(self, closure=None) -> tuple[Any, bool]:
        """The body of :meth:`step`: the loss, and whether the step was taken (False when a
        non-finite gradient skipped it, ``nonfinite="skip"``). torch wraps every class's
        ``step`` to run the step hooks, so a subclass that extends the step calls this,
        not ``super().step``."""
        loss = run_closure(closure)
        # Check every gradient before touching anything, so a bad one changes nothing.
        work = params_with_grad("Muon", self.param_groups)
        for group, p in work:
            if group["use_muon"] and p.grad.shape != p.shape:
                raise RuntimeError(
                    f"Muon: gradient of shape {tuple(p.grad.shape)} for a parameter of "
                    f"shape {tuple(p.shape)}"
                )
        if not self._gradients_finite(
            "Muon", [p for _, p in work], lambda p: describe_param(self.param_groups, p)
        ):
            return loss, False

        for group, p in work:
            state = self._init_state(p, group)
            if group["use_muon"]:
                h = _arguments(group, _MUON_ARGUMENTS)
                muon_update_(p, p.grad, state["momentum_buffer"], **h)
            else:
                h = _arguments(group, _ADAMW_ARGUMENTS)
                adamw_update_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], **h)
        return loss, True

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            if group["use_muon"]:
                # One buffer of the parameter's size and dtype: 4 bytes/param in float32.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                # Step as a float32 0-d tensor, as torch.optim.AdamW (float64 under a
                # float64 default dtype is not needed: integers are exact in float32).
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                # Two moments of the parameter's size and dtype: 8 bytes/param in float32.
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # -- checkpoints ---------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`.

        The saved groups are checked against this optimizer's parameters first (same
        number of groups and parameters, valid hyperparameters, 2-D parameters in Muon
        groups, state buffers of the parameters' shapes); on a mismatch a ``ValueError``
        says what differs and the optimizer is left as it was. Buffers come back in the
        parameter's dtype and on its device, as torch.optim casts them, and ``step`` as
        saved, on the CPU; they are private copies, never shared with ``state_dict``. Load
        hooks run as in ``torch.optim``, and a ``step`` saved as a Python number is taken
        as torch.optim takes it (:func:`~microadam.optim._common.load_checked_state_dict`).
        """
        load_checked_state_dict(
            self,
            state_dict,
            check_group=self._check_saved_group,
            check_state=self._check_saved_state,
            restore=self._restore_saved,
            after_load=self._after_load,
        )

    # What load_state_dict checks and how it restores, one method each so that a subclass
    # with more state (MuonClip) extends them.

    def _check_saved_group(self, group: dict, merged: dict, index: int) -> None:
        if merged.get("use_muon") is not group["use_muon"]:
            raise ValueError(
                f"it has use_muon={merged.get('use_muon')!r}, the optimizer's has "
                f"use_muon={group['use_muon']}"
            )
        _validate_group(merged)
        _check_params(merged, index)

    def _check_saved_state(self, p: torch.Tensor, merged: dict, saved: dict) -> None:
        where = describe_param(self.param_groups, p)
        keys = ("momentum_buffer",) if merged["use_muon"] else ("exp_avg", "exp_avg_sq")
        for key in (*keys, *(() if merged["use_muon"] else ("step",))):
            if not isinstance(saved.get(key), torch.Tensor):
                raise ValueError(f"the state of {where} has no tensor {key!r}")
        for key in keys:
            got = tuple(saved[key].shape)
            if got != tuple(p.shape):
                raise ValueError(f"{key} of {where} has shape {got}, not the parameter's")

    def _restore_saved(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
        if key == "step":
            return value.detach().to(device="cpu", copy=True)
        dtype = p.dtype if value.is_floating_point() else value.dtype
        return value.detach().to(device=p.device, dtype=dtype, copy=True)

    def _after_load(self) -> None:
        """Run after the state is loaded, before the load post-hooks."""


# The keyword arguments of muon_update_ and adamw_update_ besides lr, read from a group.
_MUON_ARGUMENTS = (
    "weight_decay",
    "momentum",
    "nesterov",
    "ns_coefficients",
    "ns_steps",
    "eps",
    "adjust_lr_fn",
    "ns_dtype",
)
_ADAMW_ARGUMENTS = ("betas", "eps", "weight_decay")


def _arguments(group: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``lr`` (a tensor lr read once) and ``keys`` of ``group``, for an update function."""
    lr = group["lr"]
    return {"lr": lr.item() if isinstance(lr, torch.Tensor) else lr, **{k: group[k] for k in keys}}


def _as_tuple(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


# -- grouping -----------------------------------------------------------------------------


def muon_param_groups(
    model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    last_linear_is_head: bool = True,
    muon_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's parameters into a Muon group and an AdamW group for :class:`Muon`.

    Returns ``[muon_group, adamw_group]``, always in that order and always both (a group
    may be empty), so that group indices, and so checkpoints, do not depend on the model.
    Parameters keep the order of ``named_parameters()``; a parameter shared between
    modules (tied weights) appears once.

    A parameter goes to the AdamW group if any of these holds, and to Muon otherwise:

    1. it is not 2-D (biases, norm gains, scalars, convolution kernels, 3-D+ embeddings);
    2. it belongs to an ``nn.Embedding`` or ``nn.EmbeddingBag`` (module input only);
    3. it belongs to the last ``nn.Linear`` of ``model.modules()``, the output head
       (module input only; ``last_linear_is_head=False`` turns this off);
    4. one component of its dotted name equals one of ``head_names`` (default
       ``("lm_head", "head", "heads", "classifier")``, an exact match, so ``heads.0`` and
       ``lm_head`` match but ``head_dim`` or ``attn_heads`` do not), or contains
       ``"emb"`` (``embed_tokens``, ``word_embeddings``, ``pos_embed``, ``tok_emb``,
       ``pos_emb``; case-insensitive).

    For tied weights every name and every owning module counts, so a ``lm_head`` tied to
    an embedding goes to AdamW. ``fc_out`` is not a default head name: GPT-J-style MLPs
    call a hidden projection ``fc_out``; a final ``fc_out`` layer is caught by rule 3, and
    ``head_names=(*DEFAULT_HEAD_NAMES, "fc_out")`` adds it. Given ``(name, tensor)`` pairs
    instead of a module, only rules 1 and 4 apply.

    Args:
        model_or_named_params: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        head_names: dotted-name components that mark the output head.
        last_linear_is_head: apply rule 3 (default: True).
        muon_options: extra keys for the Muon group, e.g. ``{"lr": 0.02}``.
        adamw_options: extra keys for the AdamW group, e.g. ``{"lr": 3e-4}``.
    """
    heads = set(head_names)
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    adamw_modules: set[int] = set()
    if isinstance(model_or_named_params, nn.Module):
        model = model_or_named_params
        named = model.named_parameters(remove_duplicate=False)
        from_module = True
        owned_by_adamw = [
            m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        ]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if last_linear_is_head and linears:
            owned_by_adamw.append(linears[-1])
        for module in owned_by_adamw:
            adamw_modules.update(id(p) for p in module.parameters(recurse=False))
    else:
        named = model_or_named_params
        from_module = False
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"muon_param_groups: {name!r} is a {type(p).__name__}, not a tensor")
        tensors.setdefault(id(p), p)
        names.setdefault(id(p), []).append(name)

    def to_adamw(p: torch.Tensor) -> bool:
        if p.ndim != 2 or id(p) in adamw_modules:
            return True
        parts = [part for name in names[id(p)] for part in name.split(".")]
        return any(part in heads or _EMBEDDING_SUBSTRING in part.lower() for part in parts)

    muon_params, adamw_params = [], []
    for p in tensors.values():
        if from_module and not p.requires_grad:  # a module's frozen parameters are left out
            continue
        (adamw_params if to_adamw(p) else muon_params).append(p)
    return [
        {**(muon_options or {}), "params": muon_params, "use_muon": True},
        {**(adamw_options or {}), "params": adamw_params, "use_muon": False},
    ]
