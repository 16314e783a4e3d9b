"""MuonClip: Muon with QK-clip, the per-head rescaling of query and key projections that
keeps attention logits below a threshold (Kimi K2).

:class:`MuonClip` is :class:`~microadam.optim.muon.Muon` (the same groups, update and
state) plus, after every step, QK-clip on the attention layers it watches. Forward hooks
installed by :meth:`MuonClip.watch` record each head's largest pre-softmax logit; ``step``
rescales the query and key rows of every head whose logit exceeded ``qk_clip_tau``. The
mathematics lives in :func:`max_attention_logit` and :func:`qk_clip_`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from microadam.optim._common import check_number, check_positive, describe_param
from microadam.optim.muon import (
    DEFAULT_A,
    DEFAULT_B,
    DEFAULT_C,
    DEFAULT_NS_STEPS,
    EPS,
    Muon,
)

__all__ = [
    "DEFAULT_QK_CLIP_ALPHA",
    "DEFAULT_QK_CLIP_TAU",
    "MuonClip",
    "max_attention_logit",
    "qk_clip_",
]

# Kimi K2 (arXiv:2507.20534), Sec. 2.1: tau = 100 for K2's pre-training, and the even split
# alpha = 1/2 of the per-head rule for multi-head attention.
DEFAULT_QK_CLIP_TAU = 100.0
DEFAULT_QK_CLIP_ALPHA = 0.5

# Per-head statistics kept in the state of each watched layer's query weight, (H,) tensors
# of at least float32: 4 H bytes each. Not Muon state: see MuonClip._init_state.
_MAX_LOGIT = "qk_max_logit"  # max of the forward passes since the last step, -inf if none
_LAST_MAX_LOGIT = "qk_last_max_logit"  # what the last step clipped against, for logging
_STATE_KEYS = (_MAX_LOGIT, _LAST_MAX_LOGIT)

# nn.MultiheadAttention.forward's parameters, in order (the hooks see args and kwargs).
_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
_WATCHABLE = (
    "nn.MultiheadAttention, a module with a fused q|k|v nn.Linear `qkv`, an int `n_head` and "
    "a bool `is_causal` (the bench's TinyGPT blocks), or a fused q|k|v nn.Linear given with "
    "num_heads and causal"
)


# -- the mathematics --------------------------------------------------------------------


def max_attention_logit(
    q: torch.Tensor, k: torch.Tensor, masked: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Each head's largest attention logit :math:`\max_{n,i,j} q_{n,i}^{h\top} k_{n,j}^h /
    \sqrt{d_h}` over the entries that ``masked`` does not exclude.

    Args:
        q: queries of shape ``(N, L, H, d_h)``.
        k: keys of shape ``(N, S, H, d_h)``.
        masked: a bool tensor broadcastable to ``(N, H, L, S)``, True where a logit is not
            used (masked out), or None (every logit is used).

    Returns:
        A tensor of shape ``(H,)`` in the dtype of ``q`` and ``k``; ``-inf`` for a head whose
        logits are all masked. Builds the ``N x H x L x S`` logits once: the memory of one
        materialized attention matrix.
    """
    logits = torch.einsum("nlhd,nshd->nhls", q, k).div_(math.sqrt(q.shape[-1]))
    if masked is not None:
        logits.masked_fill_(masked, -math.inf)
    return logits.amax(dim=(0, 2, 3))


def qk_clip_(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    max_logit: torch.Tensor,
    *,
    tau: float,
    alpha: float,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
) -> None:
    r"""QK-clip of one attention layer, in place.

    ``max_logit`` holds :math:`S^h_{\max}` for the :math:`H` heads. For every head with
    :math:`S^h_{\max} > \tau`, :math:`\gamma_h = \tau / S^h_{\max}`; the head's rows of
    ``q_weight`` and ``q_bias`` are multiplied by :math:`\gamma_h^{\alpha}` and its rows of
    ``k_weight`` and ``k_bias`` by :math:`\gamma_h^{1-\alpha}`, so that every logit
    :math:`(W_q^h x + b_q^h)^\top (W_k^h y + b_k^h)` of the head is multiplied by exactly
    :math:`\gamma_h`. Head :math:`h` owns rows :math:`[h d_h, (h+1) d_h)` of each tensor (the
    layout of ``nn.MultiheadAttention`` and of ``view(..., H, d_h)``). Every other head is
    multiplied by exactly 1.0, which leaves it bit-for-bit as it was; so is a head whose
    statistic is ``-inf`` (nothing recorded) or NaN.
    """
    # gamma_h = min(1, tau / S_max^h) (K2, Sec. 2.1); where() keeps 1.0 for heads <= tau,
    # -inf and NaN, and 1 ** x == 1 exactly.
    gamma = torch.where(max_logit > tau, tau / max_logit, torch.ones_like(max_logit))
    heads = max_logit.numel()
    for tensor, exponent in (
        (q_weight, alpha),
        (q_bias, alpha),
        (k_weight, 1.0 - alpha),
        (k_bias, 1.0 - alpha),
    ):
        if tensor is None:
            continue
        factor = gamma.pow(exponent).view(heads, *([1] * tensor.dim()))
        # Splitting dim 0 into (H, d_h) is a view for any strides: the rows change in place.
        tensor.unflatten(0, (heads, -1)).mul_(factor)


# -- what is watched ----------------------------------------------------------------------


@dataclass
class _Rows:
    """Rows ``[start, stop)`` of a parameter: one projection (or its bias) of all heads."""

    param: torch.Tensor
    start: int
    stop: int

    def get(self) -> torch.Tensor:
        return self.param[self.start : self.stop]


@dataclass
class _Watched:
    """One watched attention layer: where its query and key rows are, and its hook."""

    name: str
    source: nn.Module  # the module that was recognised (for idempotent watch calls)
    num_heads: int
    q: _Rows
    k: _Rows
    q_bias: _Rows | None
    k_bias: _Rows | None
    handle: Any = None

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        rows = (("query weight", self.q), ("key weight", self.k))
        rows += (("query bias", self.q_bias), ("key bias", self.k_bias))
        return [(what, r.param) for what, r in rows if r is not None]


def _where(module: nn.Module, name: str) -> str:
    """How a message names a layer: its class, and its name within the watched module."""
    return f"{type(module).__name__} {name!r}" if name else type(module).__name__


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # At least float32: a bf16 maximum has 3 significant digits, too few to set gamma.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Under autocast einsum and linear would run in bf16/fp16 whatever their inputs.
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _as_masked(mask: torch.Tensor) -> torch.Tensor:
    """True where a logit is not used: a bool mask as given (True = masked, torch's
    convention), a float mask where it is -inf (an additive finite bias leaves the logit
    in use; the clip can only scale its q.k part)."""
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def _mha_max_logit(watched: _Watched, module: nn.MultiheadAttention, args, kwargs):
    """Recompute q and k from the inputs of ``nn.MultiheadAttention.forward``, as
    ``F.multi_head_attention_forward`` does, and take the max over the used logits."""
    bound = {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}
    query, key = bound["query"], bound["key"]
    key_padding_mask = bound.get("key_padding_mask")
    attn_mask = bound.get("attn_mask")
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not module.batch_first:  # (L, N, E) -> (N, L, E)
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    w_q, w_k = watched.q.get(), watched.k.get()
    b_q = watched.q_bias.get() if watched.q_bias is not None else None
    b_k = watched.k_bias.get() if watched.k_bias is not None else None
    dtype = _compute_dtype(query, key, w_q)
    with _no_autocast(query.device):
        q = F.linear(query.to(dtype), w_q.to(dtype), None if b_q is None else b_q.to(dtype))
        k = F.linear(key.to(dtype), w_k.to(dtype), None if b_k is None else b_k.to(dtype))
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        heads = watched.num_heads
        q = q.unflatten(-1, (heads, -1))
        k = k.unflatten(-1, (heads, -1))
        masked = None
        if attn_mask is not None:
            # (L, S), or (N * H, L, S) batch-major as torch flattens it
            masked = _as_masked(attn_mask)
            shape = (1, 1) if masked.dim() == 2 else (-1, heads)
            masked = masked.reshape(*shape, length, source)
        elif bound.get("is_causal", False):  # torch requires attn_mask then; be safe
            masked = torch.ones(length, source, dtype=torch.bool, device=q.device).triu_(1)
        if key_padding_mask is not None:
            padded = _as_masked(key_padding_mask).view(n, 1, 1, source)
            masked = padded if masked is None else masked | padded
        # add_zero_attn's appended zero key is left out: its logit is 0 whatever the clip does.
        return max_attention_logit(q, k, masked)


def _fused_max_logit(watched: _Watched, causal: bool, output: torch.Tensor) -> torch.Tensor:
    """The max over the logits of a fused q|k|v projection's output ``(..., T, 3 d)``."""
    x = output.detach()
    x = x.unsqueeze(0) if x.dim() == 2 else x.flatten(0, -3)  # (N, T, 3 d)
    d = watched.q.stop - watched.q.start
    dtype = _compute_dtype(x)
    with _no_autocast(x.device):
        q = x[..., :d].to(dtype).unflatten(-1, (watched.num_heads, -1))
        k = x[..., d : 2 * d].to(dtype).unflatten(-1, (watched.num_heads, -1))
        t = x.shape[1]
        masked = torch.ones(t, t, dtype=torch.bool, device=x.device).triu_(1) if causal else None
        return max_attention_logit(q, k, masked)


def _recording_hook(
    opt_ref: Callable[[], MuonClip | None],
    watched: _Watched,
    max_logit: Callable[..., torch.Tensor],
) -> Callable[..., None]:
    """The forward hook of one watched layer: records ``max_logit(module, args, kwargs,
    output)`` in training mode with gradients enabled; returns None, so the output stays."""

    def hook(module, args, kwargs, output):
        opt = opt_ref()
        if opt is None:  # the optimizer is gone (only a weak reference is kept): so is this
            watched.handle.remove()
        elif module.training and torch.is_grad_enabled():
            with torch.no_grad():
                opt._record(watched, max_logit(module, args, kwargs, output))

    return hook


# -- the optimizer ------------------------------------------------------------------------


def _check_tau(tau: Any) -> None:
    check_positive("qk_clip_tau", tau)  # inf switches the clip off


def _check_alpha(alpha: Any) -> None:
    check_number("qk_clip_alpha", alpha, "0 <= qk_clip_alpha <= 1", lambda a: 0 <= a <= 1)


def _check_clip_group(group: Mapping[str, Any]) -> None:
    _check_tau(group["qk_clip_tau"])
    _check_alpha(group["qk_clip_alpha"])


class MuonClip(Muon):
    r"""Muon with QK-clip: after each step, every watched attention head whose largest
    logit exceeded :math:`\tau` has its query and key projections scaled down to :math:`\tau`.

    The optimizer is :class:`~microadam.optim.muon.Muon`, unchanged: the same ``use_muon``
    groups, the same Muon and AdamW updates, the same state. What it adds is QK-clip from
    Kimi K2's MuonClip (Kimi Team, 2025, Sec. 2.1 and Algorithm 1). :meth:`watch` installs
    forward hooks on attention layers; during each training forward pass they record, per
    head :math:`h`, the largest pre-softmax logit

    .. math::
        S^h_{\max} = \frac{1}{\sqrt{d_h}} \max_{X \in B} \max_{i,j}\, q_i^{h\top} k_j^h

    (the max-logit definition of Sec. 2.1, :math:`d_h` the head dimension, over every batch
    :math:`X` seen since the last step); after the update, ``step`` applies the per-head
    clip factor :math:`\gamma_h = \min(1, \tau / S^h_{\max})` to the head's query and key
    rows, and resets the statistics.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt} \\
            &\textbf{input}: \text{the inputs of } \textit{Muon}, \; \tau \text{ (qk\_clip\_tau)},
                \; \alpha \text{ (qk\_clip\_alpha)} \\
            &\textbf{initialize}: S^h_{\max} \leftarrow -\infty \text{ for every watched
                head } h \\
            &\rule{110mm}{0.4pt} \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm} \textbf{each training forward pass}: \;
                S^h_{\max} \leftarrow \max\Big(S^h_{\max},\;
                \tfrac{1}{\sqrt{d_h}} \max_{(i,j) \text{ used}} q_i^{h\top} k_j^h\Big) \\
            &\hspace{5mm} \theta_t \leftarrow \textit{Muon}(\theta_{t-1}, g_t)
                \quad \text{(Muon groups; AdamW groups as in } \textit{Muon}) \\
            &\hspace{5mm} \textbf{for} \: \text{every watched head } h
                \text{ with } S^h_{\max} > \tau \: \textbf{do} \\
            &\hspace{10mm} \gamma_h \leftarrow \tau / S^h_{\max} \\
            &\hspace{10mm} W_q^h \leftarrow \gamma_h^{\alpha} W_q^h, \quad
                b_q^h \leftarrow \gamma_h^{\alpha} b_q^h \\
            &\hspace{10mm} W_k^h \leftarrow \gamma_h^{1-\alpha} W_k^h, \quad
                b_k^h \leftarrow \gamma_h^{1-\alpha} b_k^h \\
            &\hspace{5mm} S^h_{\max} \leftarrow -\infty \text{ for every watched head } h \\
            &\rule{110mm}{0.4pt} \\[-1.ex]
            &\bf{return} \: \theta_t \\[-1.ex]
            &\rule{110mm}{0.4pt} \\[-1.ex]
       \end{aligned}

    With :math:`\alpha = 1/2` this is K2's per-head rule for multi-head attention,
    :math:`W_q^h \leftarrow \sqrt{\gamma_h} W_q^h,\; W_k^h \leftarrow \sqrt{\gamma_h}
    W_k^h`; a head at or below :math:`\tau` is untouched (bit-for-bit), and the logits of
    a clipped head are multiplied by exactly :math:`\gamma_h`, so its largest logit on the
    same batch would now be :math:`\tau`.

    Watched layers (:meth:`watch`):

    - ``nn.MultiheadAttention`` (fused ``in_proj_weight`` of shape ``(3E, E)`` or separate
      ``q_proj_weight``/``k_proj_weight``, ``in_proj_bias``, ``batch_first`` or not,
      batched or unbatched). Its forward does not expose q and k, so the hook recomputes
      them from the inputs, ``F.linear`` with the query and key rows, and the logits.
    - A module with a fused ``qkv`` ``nn.Linear`` (output ``[q | k | v]``, ``d`` columns
      each), an int ``n_head`` and a bool ``is_causal``: the bench's TinyGPT blocks. The
      hook sits on ``qkv`` and reads q and k off its output, so nothing is recomputed but
      the logits. Its output must be ``(batch, sequence, 3 d)`` or ``(sequence, 3 d)``, and
      the logits must be :math:`q \cdot k / \sqrt{d_h}` of those heads, with no rotary
      embedding or QK-norm in between.
    - Such a fused ``nn.Linear`` itself, given with ``num_heads`` and ``causal``.

    .. note::
        Conventions. *Used logits only*: the max is over the logits the softmax sees. A
        causal layer (``is_causal=True``, TinyGPT) counts only :math:`j \le i`; for
        ``nn.MultiheadAttention`` an ``attn_mask`` or ``key_padding_mask`` entry that is
        True (bool) or :math:`-\infty` (float) excludes the logit. A finite additive float
        mask is a bias the clip cannot scale: the logit counts without it (and
        ``add_zero_attn``'s zero key, whose logit is 0 whatever the clip does, is left out).
        *Bias*: the logit is bilinear in :math:`(W_q x + b_q)` and :math:`(W_k y + b_k)`, so
        a head's slice of the projection bias is scaled with its rows (by the same
        :math:`\gamma_h^\alpha` or :math:`\gamma_h^{1-\alpha}`), which scales every logit of
        the head by exactly :math:`\gamma_h`; scaling the rows alone would not. A bias in
        another param group (the AdamW group, as :func:`muon_param_groups` puts it) is
        scaled all the same; no optimizer state is rescaled (as in K2).
        *What counts*: a forward pass is recorded only when the module is in training mode
        and gradients are enabled, so an evaluation under ``torch.no_grad()``,
        ``torch.inference_mode()`` or ``model.eval()`` changes nothing; every recorded pass
        since the last step counts (gradient accumulation: the max over the micro-batches).
        The hooks compute under ``no_grad`` and return nothing: the module's output, its
        gradients and so the Muon update are exactly those without them.
        *Which group*: ``qk_clip_tau`` and ``qk_clip_alpha`` are read from the param group
        of the layer's query weight. The statistics are kept in at least float32 and
        computed with autocast off. ``qk_clip_tau=float("inf")`` makes this Muon exactly.

    .. note::
        Not covered. K2 uses multi-head latent attention (MLA), where each head's
        non-rotary query and key parts :math:`q^C, k^C` are scaled by
        :math:`\sqrt{\gamma_h}`, the per-head rotary query :math:`q^R` by :math:`\gamma_h`
        and the shared rotary key :math:`k^R` is left alone; no MLA module is recognised
        here, so that special case does not apply. Neither do rotary embeddings, QK-norm or
        ``add_bias_kv=True`` (whose learned ``bias_k`` would be an unscaled key): such layers
        are not recognised or are refused. With data parallelism each process sees only its
        own batch: all-reduce every ``qk_max_logit`` with ``ReduceOp.MAX`` before ``step`` so
        that all processes clip alike. The hooks keep only a weak reference to the
        optimizer and remove themselves once it is gone.

    Memory: Muon's state, plus two ``(H,)`` float32 (float64 for float64 parameters)
    tensors per watched layer, ``qk_max_logit`` (the running max of the current step) and
    ``qk_last_max_logit`` (what the last step clipped against: log it to watch the max
    logit), in the state of the layer's query weight, so ``state_dict()`` carries them.
    Each recorded forward pass builds one ``N x H x L x S`` logits tensor (the memory and
    the :math:`2 N H L S d_h` flops of the attention's :math:`QK^\top`); for
    ``nn.MultiheadAttention`` also the q and k projections again
    (:math:`2 N (L + S) E^2` flops). A step adds four in-place row scalings per layer and
    no host synchronisation.

    Args:
        params: iterable of parameters or param groups, as :class:`Muon` (see
            :func:`~microadam.optim.muon.muon_param_groups`).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
            adjust_lr_fn, ns_dtype, adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay,
            nonfinite: as :class:`Muon`, with its defaults (K2 trained with
            ``adjust_lr_fn="match_rms_adamw"`` and weight decay 0.1). A step skipped for a
            non-finite gradient (``nonfinite="skip"``) clips nothing either.
        qk_clip_tau (float, optional): :math:`\tau > 0`, the logit threshold; ``inf``
            turns the clip off (default: 100, K2's).
        qk_clip_alpha (float, optional): :math:`\alpha \in [0, 1]`, the share of the clip
            taken by the query (default: 0.5).

    Example:
        >>> import torch
        >>> from microadam.optim.muon import muon_param_groups
        >>> from microadam.optim.muonclip import MuonClip
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> attn = torch.nn.MultiheadAttention(16, num_heads=4, batch_first=True)
        >>> opt = MuonClip(muon_param_groups(attn, last_linear_is_head=False), qk_clip_tau=0.1)
        >>> opt.watch(attn)
        ['']
        >>> x = torch.randn(2, 5, 16)
        >>> attn(x, x, x)[0].square().mean().backward()
        >>> opt.step()
        >>> opt.state[attn.in_proj_weight]["qk_last_max_logit"].shape
        torch.Size([4])
        >>> opt.zero_grad()

    References:
        Kimi Team. "Kimi K2: Open Agentic Intelligence." 2025. arXiv:2507.20534
        (Sec. 2.1, QK-Clip: the max logit :math:`S^h_{\max}`, :math:`\gamma_h = \min(1,
        \tau / S^h_{\max})`, :math:`W_q^h \leftarrow \gamma_h^{\alpha} W_q^h`,
        :math:`W_k^h \leftarrow \gamma_h^{1-\alpha} W_k^h`, the MLA case; Algorithm 1,
        MuonClip).

        J. Su. "QK-Clip: Taking Muon One Step Further on the Path to Scaling Up." Blog
        post, 2025. https://kexue.fm/archives/11126
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
        qk_clip_tau: float = DEFAULT_QK_CLIP_TAU,
        qk_clip_alpha: float = DEFAULT_QK_CLIP_ALPHA,
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_lr: float | torch.Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite: str = "raise",
    ) -> None:
        _check_tau(qk_clip_tau)
        _check_alpha(qk_clip_alpha)
        # The watched layers: runtime wiring (modules and hook handles), not state; a
        # fresh optimizer is told again with watch().
        self._qk_watched: list[_Watched] = []
        super().__init__(
            params,
            lr,
            weight_decay,
            momentum,
            nesterov,
            ns_coefficients,
            eps,
            ns_steps,
            adjust_lr_fn,
            ns_dtype=ns_dtype,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            nonfinite=nonfinite,
        )
        # Muon builds its own defaults, so the clip's join them here and fill the groups
        # made during construction; add_param_group fills later ones.
        self.defaults.update(qk_clip_tau=qk_clip_tau, qk_clip_alpha=qk_clip_alpha)
        for group in self.param_groups:
            self._fill_clip_group(group)

    def _fill_clip_group(self, group: dict[str, Any]) -> None:
        group.setdefault("qk_clip_tau", self.defaults["qk_clip_tau"])
        group.setdefault("qk_clip_alpha", self.defaults["qk_clip_alpha"])
        _check_clip_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "qk_clip_tau" in self.defaults:  # else __init__ fills the group afterwards
            try:
                self._fill_clip_group(self.param_groups[-1])
            except ValueError:
                self.param_groups.pop()
                raise

    # -- watching attention layers -------------------------------------------------------

    def watch(
        self,
        module: nn.Module,
        num_heads: int | None = None,
        *,
        causal: bool | None = None,
        strict: bool = True,
    ) -> list[str]:
        """Watch the attention layers of ``module`` for QK-clip.

        Every ``nn.MultiheadAttention`` among ``module.named_modules()`` (``module``
        itself included) and every module with a fused ``qkv`` ``nn.Linear``, an int
        ``n_head`` and a bool ``is_causal`` (the bench's TinyGPT blocks) is watched; or,
        with ``num_heads`` and ``causal``, ``module`` is itself a fused q|k|v
        ``nn.Linear`` (output ``[q | k | v]``, e.g. nanoGPT's ``c_attn``). Watching a
        layer again is a no-op. Their query and key weights (and biases) must be among
        this optimizer's parameters. Everything is checked before anything is watched.

        Args:
            module: the model, an attention layer, or a fused q|k|v ``nn.Linear``.
            num_heads: the number of heads, only for a fused ``nn.Linear``.
            causal: whether the attention is causal, only for a fused ``nn.Linear``.
            strict: raise ``ValueError`` if ``module`` has no attention layer to watch or
                one whose query or key tensors the optimizer does not hold (default: True).
                With False such layers are left out, silently:
                :func:`~microadam.optim.registry.create_optimizer` passes False, so that a
                model without attention, or with frozen attention, gets plain Muon there.

        Returns:
            The names (as in ``module.named_modules()``, ``""`` for ``module`` itself) of
            the layers watched, newly or already.
        """
        if not isinstance(module, nn.Module):
            raise ValueError(f"Invalid module: a {type(module).__name__} (expected an nn.Module)")
        if num_heads is not None or causal is not None:
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"Invalid num_heads: {num_heads} (num_heads and causal describe a fused "
                    f"q|k|v nn.Linear; a {type(module).__name__} is not one)"
                )
            found = [("", self._describe_fused(module, module, "", num_heads, causal))]
        else:
            found = []
            for name, m in module.named_modules():
                if isinstance(m, nn.MultiheadAttention):
                    found.append((name, self._describe_mha(m, name)))
                elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "n_head"):
                    is_causal = getattr(m, "is_causal", None)
                    if not isinstance(is_causal, bool):
                        raise ValueError(
                            f"Invalid module: {_where(m, name)} has qkv and n_head "
                            f"but is_causal={is_causal!r} (expected a bool is_causal)"
                        )
                    found.append((name, self._describe_fused(m.qkv, m, name, m.n_head, is_causal)))
            if not found and strict:
                raise ValueError(
                    f"Invalid module: {type(module).__name__} has no attention layer to watch "
                    f"(expected {_WATCHABLE})"
                )
        # Every layer is checked before any is watched: an error leaves nothing half-done.
        verdicts = [self._vet(watched, strict) for _, (watched, _, _) in found]
        for (_, (watched, hook_on, max_logit)), verdict in zip(found, verdicts, strict=True):
            if verdict == "new":
                self._qk_watched.append(watched)
                hook = _recording_hook(weakref.ref(self), watched, max_logit)
                watched.handle = hook_on.register_forward_hook(hook, with_kwargs=True)
        return [name for (name, _), v in zip(found, verdicts, strict=True) if v != "skip"]

    def _vet(self, watched: _Watched, strict: bool) -> str:
        """``"new"``, ``"known"`` (its module is watched already) or ``"skip"`` (not
        strict, and the optimizer does not hold all its q and k tensors); raises
        ``ValueError`` for what cannot be watched."""
        source = watched.source
        for other in self._qk_watched:
            if other.q.param is watched.q.param:
                if other.source is source:
                    return "known"
                raise ValueError(
                    f"Invalid module: {_where(source, watched.name)} has the query "
                    f"weight of the layer already watched as {other.name!r}"
                )
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for what, p in watched.tensors():
            if id(p) not in owned:
                if not strict:
                    return "skip"
                raise ValueError(
                    f"Invalid module: the {what} (shape {tuple(p.shape)}) of "
                    f"{_where(source, watched.name)} is not among the optimizer's "
                    "parameters (QK-clip rescales it, so the optimizer must hold it)"
                )
        state = self.state.get(watched.q.param, {})
        for key in _STATE_KEYS:
            if key in state and state[key].shape != (watched.num_heads,):
                raise ValueError(
                    f"Invalid module: {_where(source, watched.name)} has "
                    f"{watched.num_heads} heads, its loaded {key} has shape "
                    f"{tuple(state[key].shape)}"
                )
        return "new"

    @staticmethod
    def _check_heads(num_heads: Any, dim: int, source: nn.Module, name: str) -> None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"Invalid num_heads: {num_heads} (expected an integer >= 1)")
        if dim % num_heads:
            raise ValueError(
                f"Invalid num_heads: {num_heads} (expected a divisor of the attention "
                f"dimension {dim} of {_where(source, name)})"
            )

    def _describe_mha(self, m: nn.MultiheadAttention, name: str):
        if m.bias_k is not None:
            raise ValueError(
                f"Invalid module: {_where(m, name)} with add_bias_kv=True (expected "
                "add_bias_kv=False: its learned bias_k is a key QK-clip does not rescale)"
            )
        e = m.embed_dim
        self._check_heads(m.num_heads, e, m, name)
        if m.in_proj_weight is not None:
            q, k = _Rows(m.in_proj_weight, 0, e), _Rows(m.in_proj_weight, e, 2 * e)
        else:
            q, k = _Rows(m.q_proj_weight, 0, e), _Rows(m.k_proj_weight, 0, e)
        bias = m.in_proj_bias
        watched = _Watched(
            name,
            m,
            m.num_heads,
            q,
            k,
            None if bias is None else _Rows(bias, 0, e),
            None if bias is None else _Rows(bias, e, 2 * e),
        )

        def max_logit(module, args, kwargs, output):
            return _mha_max_logit(watched, module, args, kwargs)

        return watched, m, max_logit

    def _describe_fused(
        self, linear: nn.Linear, source: nn.Module, name: str, num_heads: Any, causal: Any
    ):
        if not isinstance(causal, bool):
            raise ValueError(
                f"Invalid causal: {causal!r} (expected True or False for a fused q|k|v nn.Linear)"
            )
        if linear.out_features % 3:
            raise ValueError(
                f"Invalid module: {linear} (expected a fused q|k|v nn.Linear, out_features = 3 d)"
            )
        d = linear.out_features // 3
        self._check_heads(num_heads, d, source, name)
        bias = linear.bias
        watched = _Watched(
            name,
            source,
            num_heads,
            _Rows(linear.weight, 0, d),
            _Rows(linear.weight, d, 2 * d),
            None if bias is None else _Rows(bias, 0, d),
            None if bias is None else _Rows(bias, d, 2 * d),
        )

        def max_logit(module, args, kwargs, output):
            return _fused_max_logit(watched, causal, output)

        return watched, linear, max_logit

    def _record(self, watched: _Watched, max_logit: torch.Tensor) -> None:
        """Fold one forward pass's per-head max into the running max of the step."""
        p = watched.q.param
        state = self.state[p]
        if _MAX_LOGIT not in state:
            dtype = _compute_dtype(p)
            state[_MAX_LOGIT] = torch.full(
                (watched.num_heads,), -math.inf, dtype=dtype, device=p.device
            )
            state[_LAST_MAX_LOGIT] = state[_MAX_LOGIT].clone()
        running = state[_MAX_LOGIT]
        torch.maximum(running, max_logit.to(running), out=running)

    # -- stepping ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step: Muon's, then QK-clip.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns
                the loss (its forward pass is recorded for this step's clip).
        """
        loss, stepped = self._muon_step(closure)  # not super().step(): hooks would run twice
        if not stepped or not self._qk_watched:
            # A skipped step (nonfinite="skip") clips nothing either, and keeps the logits
            # recorded since the last step for the next one.
            return loss
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for watched in self._qk_watched:
            state = self.state.get(watched.q.param)
            if not state or _MAX_LOGIT not in state:
                continue  # nothing recorded yet
            group = group_of[id(watched.q.param)]
            tau, alpha = group["qk_clip_tau"], group["qk_clip_alpha"]
            running = state[_MAX_LOGIT]
            if not math.isinf(tau):
                qk_clip_(
                    watched.q.get(),
                    watched.k.get(),
                    running,
                    tau=tau,
                    alpha=alpha,
                    q_bias=None if watched.q_bias is None else watched.q_bias.get(),
                    k_bias=None if watched.k_bias is None else watched.k_bias.get(),
                )
            state[_LAST_MAX_LOGIT].copy_(running)
            running.fill_(-math.inf)
        return loss

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # Muon initializes a parameter's state when it is empty; the clip statistics may be
        # there first (a forward pass before the first step), so set them aside meanwhile.
        state = self.state[p]
        kept = {key: state.pop(key) for key in _STATE_KEYS if key in state}
        state = super()._init_state(p, group)
        state.update(kept)
        return state

    # -- checkpoints ---------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickled or deep-copied optimizer keeps torch's state but no hooks: it watches
        # nothing until told again with watch().
        super().__setstate__(state)
        self.__dict__.setdefault("_qk_watched", [])

    # load_state_dict is Muon's; the clip adds its settings, its statistics and their checks.

    def _check_saved_group(self, group: dict, merged: dict, index: int) -> None:
        # A Muon state dict has no clip settings: it loads with this optimizer's.
        for key in ("qk_clip_tau", "qk_clip_alpha"):
            merged.setdefault(key, self.defaults[key])
        super()._check_saved_group(group, merged, index)
        _check_clip_group(merged)

    def _check_saved_state(self, p: torch.Tensor, merged: dict, saved: dict) -> None:
        # Statistics alone (a forward pass before the first step) are not Muon state.
        if saved.keys() - set(_STATE_KEYS):
            super()._check_saved_state(p, merged, saved)
        heads = {id(w.q.param): w.num_heads for w in self._qk_watched}.get(id(p))
        want = f"({heads},)" if heads is not None else "(num_heads,)"
        for key in _STATE_KEYS:
            if key not in saved:
                continue
            value = saved[key]
            if (
                not isinstance(value, torch.Tensor)
                or not value.is_floating_point()
                or value.dim() != 1
                or (heads is not None and value.numel() != heads)
            ):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise ValueError(
                    f"{key} of {describe_param(self.param_groups, p)} is {got}, expected a "
                    f"floating tensor of shape {want}"
                )

    def _restore_saved(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
        if key in _STATE_KEYS:  # in at least float32 (torch would cast it to p.dtype)
            return value.detach().to(device=p.device, dtype=_compute_dtype(p), copy=True)
        return super()._restore_saved(p, key, value)

    def _after_load(self) -> None:
        for group in self.param_groups:
            self._fill_clip_group(group)
