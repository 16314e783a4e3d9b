"""Pieces this package's own optimizers share: finding the parameters to step, checking
gradients and what to do with a non-finite one (:class:`NonFiniteSteps`), naming a
parameter in an error message, pointing a warning at the user's line, checking
hyperparameters with one wording, and checking and loading state dicts."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from microadam.optim import _sharding

__all__ = [
    "FORMAT_KEYS",
    "NONFINITE_POLICIES",
    "SKIPPED_STEPS",
    "LazyText",
    "NonFiniteGradientError",
    "NonFiniteSteps",
    "all_finite",
    "base_load_state_dict",
    "caller_stacklevel",
    "check_betas",
    "check_choice",
    "check_flag",
    "check_int",
    "check_is_state_dict",
    "check_lr",
    "check_nonnegative",
    "check_number",
    "check_positive",
    "check_state_dict_format",
    "describe_param",
    "find_non_finite",
    "first_non_finite",
    "is_real_number",
    "lift_format_key",
    "load_checked_state_dict",
    "params_by_saved_id",
    "params_with_grad",
    "run_closure",
    "tensor_steps",
]


class LazyText:
    """Text made only when it is formatted: for error messages built on a hot path (naming
    a parameter walks every param group, which per parameter and step would be quadratic)."""

    def __init__(self, make: Callable[[], str]):
        self._make = make

    def __str__(self) -> str:
        return self._make()

    def __format__(self, spec: str) -> str:
        return format(self._make(), spec)


def describe_param(param_groups: list[dict[str, Any]], p: torch.Tensor) -> str:
    """``"parameter 3 of param group 1 (shape (64, 32))"``: how error messages name ``p``;
    ``"parameter '0.weight' of param group 1 (shape (64, 32))"`` when the optimizer was
    built from ``model.named_parameters()`` (torch keeps the names in the group's
    ``param_names``)."""
    for gi, group in enumerate(param_groups):
        for pi, q in enumerate(group["params"]):
            if q is p:
                names = group.get("param_names")
                named = isinstance(names, list) and len(names) == len(group["params"])
                label = repr(names[pi]) if named else pi
                return f"parameter {label} of param group {gi} (shape {tuple(p.shape)})"
    return f"parameter of shape {tuple(p.shape)}"


# Where this package's optimizers and torch's Optimizer machinery (the step hooks, the
# no_grad decorator, torch.distributed.checkpoint) live: frames that a warning skips.
_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one that
    names the first frame outside this package's optimizers and outside torch: the user's
    line (``optimizer.step()``, ``load_state_dict(...)``) whatever torch wraps around it
    (the step hooks, ``no_grad``). What ``skip_file_prefixes`` does from Python 3.12 on."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _INTERNAL_DIRS
    ):
        frame = frame.f_back
        level += 1
    return level


def params_with_grad(
    name: str, param_groups: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """``(group, param)`` for every parameter with a gradient, in order; raises
    ``RuntimeError`` on a sparse gradient or a complex parameter before anything is changed.
    ``name`` is the optimizer's, for the message."""
    work = []
    for group in param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{name} does not support sparse gradients; use torch.optim.SparseAdam "
                    "for sparse embeddings or build them with sparse=False"
                )
            if p.is_complex():
                raise RuntimeError(
                    f"{name} does not support complex parameters; optimize "
                    "torch.view_as_real(param) as a real parameter instead"
                )
            work.append((group, p))
    return work


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf: its min and max propagate both, and computing them
    is one read of ``t`` with no temporary of its size."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(torch.stack((lo, hi))).all())


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Position of the first tensor in ``tensors`` that holds NaN or inf, else None.

    The tensors are checked together: one ``_foreach_norm(inf)`` (which propagates NaN) per
    device and dtype and one host read per device, so an accelerator synchronises once per
    step instead of once per parameter. Only when something is not finite are the tensors
    looked at one by one, to name the first.
    """
    groups: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault(t.device, {}).setdefault(t.dtype, []).append(t)
    finite = True
    for by_dtype in groups.values():
        norms = [torch.stack(torch._foreach_norm(ts, math.inf)).float() for ts in by_dtype.values()]
        finite = finite and bool(torch.cat(norms).isfinite().all())
    if finite:
        return None
    return next(i for i, t in enumerate(tensors) if not all_finite(t))


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or inf, so ``step`` updated nothing (parameters and state are as
    they were): skip the batch, lower the learning rate, or clip gradients."""


def non_finite_gradient(name: str, where: Any) -> NonFiniteGradientError:
    return NonFiniteGradientError(
        f"{name}: non-finite gradient (NaN or inf) for {where}; nothing was updated. Skip "
        "this batch (zero_grad() and continue), lower the learning rate, use gradient "
        "clipping or a GradScaler, or build the optimizer with nonfinite='skip'"
    )


def find_non_finite(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The first of ``params`` whose gradient holds NaN or inf, else None. Plain gradients
    are checked together (:func:`first_non_finite`: one host read per device); a DTensor's
    local shard is checked and the verdict agreed over the ranks, so that every rank finds
    one or none does."""
    plain = [p for p in params if not _sharding.is_dtensor(p)]
    bad = first_non_finite([p.grad for p in plain])
    if bad is not None:
        return plain[bad]
    sharded = [p for p in params if _sharding.is_dtensor(p)]
    if sharded:
        finite = [all_finite(_sharding.local(p.grad)) for p in sharded]
        finite = _sharding.all_ranks_agree(finite, sharded)
        if not all(finite):
            return sharded[finite.index(False)]
    return None


# What ``step`` does with a non-finite gradient (the ``nonfinite`` argument), and the param
# group entry that counts the steps skipped.
NONFINITE_POLICIES = ("raise", "skip")
SKIPPED_STEPS = "skipped_steps"


class NonFiniteSteps:
    """The non-finite gradient policy of MicroAdam, Adapprox and Muon, mixed in before
    ``torch.optim.Optimizer``.

    ``nonfinite`` (kept in ``defaults``, not in the param groups: a step is taken or
    skipped as a whole) is ``"raise"`` (:class:`NonFiniteGradientError`) or ``"skip"``: the
    step changes nothing, warns naming the parameter, and counts itself in
    :attr:`skipped_steps`. The count is kept in every param group as ``skipped_steps`` (the
    same in each), so that ``state_dict``, ``torch.distributed.checkpoint`` and
    ``load_state_dict`` carry it; a state dict saved without it loads with 0.
    """

    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``nonfinite="skip"``), saved in the
        state dict."""
        return max((group.get(SKIPPED_STEPS, 0) for group in self.param_groups), default=0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "nonfinite" in param_group:
            raise TypeError(
                "nonfinite is an argument of the optimizer, not of a param group (a step is "
                "skipped or taken as a whole)"
            )
        count = self.skipped_steps
        super().add_param_group(param_group)  # type: ignore[misc]
        added = self.param_groups[-1]
        added.pop("nonfinite", None)  # torch copied every default into the group
        added[SKIPPED_STEPS] = count

    def _gradients_finite(
        self, name: str, params: Sequence[torch.Tensor], describe: Callable[[torch.Tensor], str]
    ) -> bool:
        """Whether every gradient of ``params`` is finite (:func:`find_non_finite`); if one is
        not, :meth:`_non_finite` raises or skips the step."""
        bad = find_non_finite(params)
        if bad is None:
            return True
        self._non_finite(name, bad, describe)
        return False

    def _non_finite(
        self, name: str, p: torch.Tensor, describe: Callable[[torch.Tensor], str]
    ) -> None:
        """``p``'s gradient is not finite and nothing was changed: raise
        :class:`NonFiniteGradientError`, or, with ``nonfinite="skip"``, count the skipped
        step and warn."""
        if self.defaults.get("nonfinite", "raise") == "raise":
            raise non_finite_gradient(name, describe(p))
        count = self.skipped_steps + 1
        for group in self.param_groups:
            group[SKIPPED_STEPS] = count
        warnings.warn(
            f"{name}: non-finite gradient (NaN or inf) for {describe(p)}; the step was "
            f"skipped and nothing was updated (nonfinite='skip'; {count} skipped so far)",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss of ``closure`` evaluated with gradients enabled (``step`` runs under
    ``no_grad``), or None without a closure: the opening of every ``step``."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


# Keys that mark the state dicts of this package's optimizers, and whose they are.
FORMAT_KEYS = {"microadam_format": "MicroAdam", "adapprox_format": "Adapprox"}


def check_is_state_dict(state_dict: Any) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has the two entries of an optimizer's."""
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("param_groups"), list)
        or not isinstance(state_dict.get("state"), dict)
    ):
        got = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict)
        raise ValueError(
            "Invalid state_dict: expected an optimizer state dict with 'state' and "
            f"'param_groups', got {got.__name__ if isinstance(got, type) else got}"
        )


def check_state_dict_format(
    opt: Optimizer, state_dict: Any, format_key: str, version: int, name: str
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` is a ``name`` state dict of ``version``.

    Shared by the ``load_state_dict`` of MicroAdam and Adapprox. A dict without
    ``format_key`` is another optimizer's: the message says whose when it can tell (one of
    :data:`FORMAT_KEYS`), else names the first parameter whose saved state has foreign
    keys and the hyperparameters ``name`` does not have, e.g. AdamW's ``amsgrad``.
    """
    check_is_state_dict(state_dict)
    groups = [g for g in state_dict["param_groups"] if isinstance(g, dict)]
    saved = state_dict.get(format_key)
    if saved == version:
        return
    if saved is not None:
        raise ValueError(
            f"Invalid state_dict: {format_key} is {saved!r}, but this version of microadam "
            f"reads {name} state dicts of format {version} only (was it saved by a "
            "different version of microadam?)"
        )

    def a(word: str) -> str:
        return f"{'an' if word[0] in 'AEIOU' else 'a'} {word}"

    for key, other in FORMAT_KEYS.items():
        if key != format_key and (key in state_dict or any(key in g for g in groups)):
            raise ValueError(
                f"Invalid state_dict: it looks like {a(other)} state dict (it has {key!r}, "
                f"no {format_key!r}), not {a(name)} one; load it into {other}"
            )
    details = []
    state = state_dict["state"]
    first = next(
        (
            (p, state[pid])
            for group, g in zip(opt.param_groups, groups, strict=False)
            for pid, p in zip(g.get("params", []), group["params"], strict=False)
            if isinstance(state.get(pid), dict) and state[pid]
        ),
        None,
    )
    if first is not None:
        details.append(f"the saved state of {opt._describe(first[0])} has keys {sorted(first[1])}")
    unknown = sorted({k for g in groups for k in g} - set(opt.defaults) - {"params"})
    if unknown:
        details.append(f"its param groups have settings {name} does not know: {unknown}")
    raise ValueError(
        f"Invalid state_dict: it has no {format_key!r}, so it looks like another optimizer's "
        f"state dict (such as torch.optim.AdamW's), not {a(name)} one"
        + (f": {'; '.join(details)}" if details else "")
        + f". Only state dicts saved by {name}.state_dict() can be loaded"
    )


def params_by_saved_id(
    param_groups: list[dict[str, Any]], saved_groups: list[Any]
) -> dict[Any, tuple[torch.Tensor, dict[str, Any]]]:
    """Saved parameter id -> (the optimizer's parameter in that place, its group's settings
    with the saved ones on top), pairing groups and parameters by position as
    ``Optimizer.load_state_dict`` does; malformed saved groups are skipped (the checks of
    ``load_state_dict`` report them)."""
    ids = {}
    for group, saved in zip(param_groups, saved_groups, strict=False):
        if not isinstance(saved, dict):
            continue
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        for pid, p in zip(saved.get("params", []), group["params"], strict=False):
            ids[pid] = (p, merged)
    return ids


def lift_format_key(state_dict: dict[str, Any], key: str) -> dict[str, Any]:
    """``state_dict`` with the format version ``key`` at the top level and not in the param
    groups. ``state_dict()`` also writes it into every group because
    ``torch.distributed.checkpoint.state_dict`` keeps only ``state`` and ``param_groups``;
    a copy is made where something changes."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return state_dict
    if key not in state_dict and groups:
        versions = {g.get(key) for g in groups}
        if len(versions) == 1 and None not in versions:
            state_dict = {**state_dict, key: versions.pop()}
    if any(key in g for g in groups):
        groups = [{k: v for k, v in g.items() if k != key} for g in groups]
        state_dict = {**state_dict, "param_groups": groups}
    return state_dict


# -- hyperparameter checks: one wording for every optimizer of the package -----------------


def is_real_number(value: Any) -> bool:
    """A Python ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(name: str, value: Any, rule: str, ok: Callable[[float], bool]) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a real number with ``ok(value)``;
    ``rule`` says what is expected, e.g. ``"eps >= 0"``."""
    if not is_real_number(value):
        raise ValueError(
            f"Invalid {name}: {value!r} (expected a number, {rule}; got {type(value).__name__})"
        )
    if not ok(value):
        raise ValueError(f"Invalid {name}: {value} (expected {rule})")


def check_nonnegative(name: str, value: Any) -> None:
    check_number(name, value, f"{name} >= 0", lambda v: v >= 0.0)


def check_positive(name: str, value: Any) -> None:
    check_number(name, value, f"{name} > 0", lambda v: v > 0.0)


def check_lr(lr: Any, name: str = "lr") -> None:
    """A learning rate: a number or a one-element tensor, at least 0."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"Invalid {name}: tensor lr must have one element, got shape {tuple(lr.shape)}"
            )
        lr = lr.item()
    check_nonnegative(name, lr)


def check_betas(betas: Any, name: str = "betas", *, first_may_be_none: bool = False) -> None:
    """A pair of coefficients in [0, 1), as torch.optim words it; ``first_may_be_none``
    for optimizers whose first moment can be switched off (``betas=(None, beta2)``)."""
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (expected a pair of floats)")
    for i, beta in enumerate(betas):
        if i == 0 and first_may_be_none and beta is None:
            continue
        rule = "None or 0 <= beta < 1" if i == 0 and first_may_be_none else "0 <= beta < 1"
        if not is_real_number(beta):
            raise ValueError(
                f"Invalid beta parameter at index {i}: {beta!r} (expected a number, {rule}; "
                f"got {type(beta).__name__})"
            )
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (expected {rule})")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        quoted = [repr(c) for c in choices]
        expected = ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")


# -- loading state dicts ------------------------------------------------------------------


def base_load_state_dict(opt: Optimizer, state_dict: dict[str, Any]) -> None:
    """``torch.optim.Optimizer.load_state_dict`` without running the load hooks, for a
    ``load_state_dict`` that runs them itself (:func:`load_checked_state_dict`)."""
    pre, post = opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks
    opt._optimizer_load_state_dict_pre_hooks = type(pre)()
    opt._optimizer_load_state_dict_post_hooks = type(post)()
    try:
        Optimizer.load_state_dict(opt, state_dict)
    finally:
        opt._optimizer_load_state_dict_pre_hooks = pre
        opt._optimizer_load_state_dict_post_hooks = post


def tensor_steps(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every per-parameter ``step`` that is a Python number (torch.optim
    accepts those, and its own tests load them) as a float32 0-d tensor, as
    ``torch.optim.Adam.__setstate__`` converts it; a copy is made where something changes.
    ``ValueError`` for a number that is not a whole count >= 0."""
    state = state_dict["state"]
    converted = {}
    for pid, saved in state.items():
        step = saved.get("step") if isinstance(saved, dict) else None
        if not is_real_number(step):
            continue
        if not (math.isfinite(step) and step >= 0 and float(step).is_integer()):
            raise ValueError(
                f"Invalid state_dict: step of parameter id {pid} is {step!r} (expected a whole "
                "number >= 0)"
            )
        converted[pid] = {**saved, "step": torch.tensor(float(step), dtype=torch.float32)}
    if not converted:
        return state_dict
    return {**state_dict, "state": {**state, **converted}}


def load_checked_state_dict(
    opt: Optimizer,
    state_dict: Any,
    *,
    check_group: Callable[[dict[str, Any], dict[str, Any], int], None],
    check_state: Callable[[torch.Tensor, dict[str, Any], dict[str, Any]], None],
    restore: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor],
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    format_key: str | None = None,
    version: int | None = None,
    name: str = "",
    keep_group_keys: Sequence[str] = (),
    layout_keys: Sequence[str] = (),
    after_load: Callable[[], None] | None = None,
) -> None:
    """The ``load_state_dict`` of this package's optimizers: everything is checked before
    anything changes, the hooks behave as in ``torch.optim``, and each state tensor comes
    back as ``restore`` says instead of through torch's cast to the parameter's dtype.

    In order: the load pre-hooks get a shallow copy of ``state_dict`` and may return a
    replacement; ``prepare`` maps what they leave (sharded state, DCP dicts); the format
    key is checked if given (:func:`check_state_dict_format`); ``step`` numbers become
    tensors (:func:`tensor_steps`); ``check_group(group, merged, index)`` checks each
    saved group against the optimizer's (``merged`` is the group with the saved settings
    on top) and ``check_state(param, merged, saved_state)`` each parameter's state, both
    raising ``ValueError`` or ``RuntimeError``, reported as ``ValueError("Invalid
    state_dict: ...")``. Only then does torch's load run, followed by ``restore(param,
    key, saved_tensor)`` for every saved tensor, ``after_load()`` and the load post-hooks.
    The settings named in ``keep_group_keys`` keep the optimizer's own values (how this
    process steps, not what the state is). Every other setting is the saved one, as in
    ``torch.optim``; for each of ``layout_keys`` (the settings the saved state's shapes
    depend on) whose saved value differs from the optimizer's, one ``UserWarning`` per
    group and key says so once the load is done. The ``skipped_steps`` counter of
    :class:`NonFiniteSteps` must be a whole number if saved, and is 0 if not.

    Keys of the saved ``state`` that are not integers belong to no parameter (what hooks
    put into ``optimizer.state``, as torch's own tests do) and are loaded as they are, as
    torch.optim does; an integer id that no parameter has is refused.
    """
    check_is_state_dict(state_dict)
    state_dict = state_dict.copy()
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    check_is_state_dict(state_dict)
    if prepare is not None:
        state_dict = prepare(state_dict)
    if format_key is not None:
        check_state_dict_format(opt, state_dict, format_key, version, name)
    state_dict = tensor_steps(state_dict)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"Invalid state_dict: it has {len(saved_groups)} param groups, the optimizer "
            f"has {len(opt.param_groups)}"
        )
    owners: dict[Any, tuple[torch.Tensor, dict[str, Any]]] = {}
    kept_saved = []  # (group index, key, saved value, the optimizer's value)
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups, strict=True)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"Invalid state_dict: param group {gi} is not a dict with 'params'")
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"Invalid state_dict: param group {gi} has {len(saved['params'])} "
                f"parameters, the optimizer's has {len(group['params'])}"
            )
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        try:
            check_group(group, merged, gi)
            if SKIPPED_STEPS in saved:
                check_int(SKIPPED_STEPS, saved[SKIPPED_STEPS], 0)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"Invalid state_dict: param group {gi}: {err}") from None
        kept_saved += [
            (gi, key, merged[key], group[key])
            for key in layout_keys
            if key in group and merged[key] != group[key]
        ]
        for pid, p in zip(saved["params"], group["params"], strict=True):
            owners[pid] = (p, merged)
    loaded = []
    for pid, saved_state in state_dict["state"].items():
        if pid not in owners:
            if isinstance(pid, int) and not isinstance(pid, bool):
                raise ValueError(f"Invalid state_dict: state for unknown parameter id {pid}")
            continue
        p, merged = owners[pid]
        if not isinstance(saved_state, dict):
            raise ValueError(
                f"Invalid state_dict: the state of parameter id {pid} is a "
                f"{type(saved_state).__name__}, not a dict"
            )
        try:
            check_state(p, merged, saved_state)
        except (ValueError, RuntimeError) as err:
            message = str(err).removeprefix("Invalid state_dict: ")
            raise ValueError(f"Invalid state_dict: {message}") from None
        loaded.append((p, saved_state))
    body = {k: v for k, v in state_dict.items() if k != format_key}
    kept = [{k: group[k] for k in keep_group_keys} for group in opt.param_groups]
    base_load_state_dict(opt, body)
    for group, values in zip(opt.param_groups, kept, strict=True):
        group.update(values)
    if isinstance(opt, NonFiniteSteps):  # the same count in every group; 0 if not saved
        count = opt.skipped_steps
        for group in opt.param_groups:
            group[SKIPPED_STEPS] = count
    for p, saved_state in loaded:
        for key, value in saved_state.items():
            if isinstance(value, torch.Tensor):
                opt.state[p][key] = restore(p, key, value)
    if after_load is not None:
        after_load()
    for hook in opt._optimizer_load_state_dict_post_hooks.values():
        hook(opt)
    for gi, key, saved_value, own_value in kept_saved:
        warnings.warn(
            f"{name or type(opt).__name__}.load_state_dict: param group {gi} was saved with "
            f"{key}={saved_value!r} and this optimizer was built with {key}={own_value!r}; "
            "the saved value is kept (the saved state's layout depends on it)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
