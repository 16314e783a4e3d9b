"""Every optimizer of the library by name: ``create_optimizer`` and ``list_optimizers``.

What PyTorch ships correctly is used as it is (the registry only fixes a default where a
name implies one, e.g. ``amsgrad``); what nobody ships well is ours; optional peers are
listed only when their package is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "OptimizerSpec",
    "all_specs",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "param_groups",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """How a registry name is built and what it costs.

    Attributes:
        name: the registry name.
        target: ``"module:attribute"`` of the class (imported lazily).
        backed_by: what implements it, for the README table.
        state_formula: optimizer-state bytes per parameter, as a formula.
        needs_closure: whether ``step`` requires a closure (line-search methods).
        preset: keyword arguments the name implies (``amsgrad=True`` for ``amsgrad``).
        defaults: keyword arguments passed unless given (``no_deprecation_warning=True``
            for GaLore, whose constructor warns otherwise).
        requires: the optional package that must be importable, if any; its import is
            quiet (:func:`_quiet_import`).
        grouping: how a module is split into param groups: ``"decay"`` (see
            :func:`param_groups`), ``"muon"`` (matrices to Muon, the rest to AdamW) or
            ``"flat"`` (one group, for the single-group line-search methods).
        watches_attention: whether, built from a module, the optimizer is handed it to
            watch its attention layers (``opt.watch(model, strict=False)``, MuonClip).
        closure_without_grad: whether the class's ``step`` calls the closure under its own
            ``torch.no_grad()``, so that a closure calling ``backward()`` fails; the
            registry then builds a subclass whose ``step`` runs the closure under
            ``torch.enable_grad()``, as torch.optim's own optimizers do
            (:func:`_grad_closure_class`).
    """

    name: str
    target: str
    backed_by: str
    state_formula: str
    needs_closure: bool = False
    preset: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    requires: str | None = None
    grouping: str = "decay"
    watches_attention: bool = False
    closure_without_grad: bool = False

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def load(self) -> Callable[..., torch.optim.Optimizer]:
        module, attr = self.target.split(":")
        if self.requires is None:
            cls = getattr(importlib.import_module(module), attr)
        else:
            with _quiet_import():
                cls = getattr(importlib.import_module(module), attr)
        return _grad_closure_class(cls, attr) if self.closure_without_grad else cls


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Silence what an optional peer says when it is imported: warnings (bitsandbytes and
    galore_torch trigger torch.jit deprecations), log records up to WARNING (bitsandbytes
    and torchao log the native kernels they cannot load, torch's pytree a registration
    notice) and prints. Errors still propagate."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


@functools.cache
def _grad_closure_class(cls: type[torch.optim.Optimizer], name: str) -> type[torch.optim.Optimizer]:
    """A subclass of ``cls`` named ``name`` (the registry's target, ``GaLoreAdamW``; same
    constructor and state) whose ``step`` runs the closure under ``torch.enable_grad()``,
    for a peer whose ``step`` is ``@torch.no_grad()`` and calls the closure as it is
    (galore_torch's). It calls ``cls``'s own ``step`` function, not the one torch wraps
    with the step hooks, so the hooks run once. Pickle finds it as an attribute of this
    module (``__getattr__`` below)."""
    base = cls.step
    inner = base.__wrapped__ if getattr(base, "hooked", False) else base

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            return inner(self, None)

        def closure_with_grad() -> Any:
            with torch.enable_grad():
                return closure()

        return inner(self, closure_with_grad)

    step.__doc__ = base.__doc__
    return type(
        name,
        (cls,),
        {
            "step": step,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": cls.__doc__,
        },
    )


def __getattr__(name: str) -> Any:
    """The classes :func:`_grad_closure_class` makes, by name, so that a pickled optimizer
    of one loads again (pickle looks its class up in this module)."""
    for spec in _SPECS.values():
        if spec.closure_without_grad and spec.target.endswith(f":{name}") and spec.available():
            return spec.load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_SPECS: dict[str, OptimizerSpec] = {}


def _register(spec: OptimizerSpec) -> None:
    _SPECS[spec.name] = spec


for _spec in (
    OptimizerSpec("sgd", "torch.optim:SGD", "torch.optim.SGD", "0 (4 with momentum)"),
    OptimizerSpec(
        "rmsprop", "torch.optim:RMSprop", "torch.optim.RMSprop", "4 (+4 momentum, +4 centered)"
    ),
    OptimizerSpec("adagrad", "torch.optim:Adagrad", "torch.optim.Adagrad", "4"),
    OptimizerSpec("adadelta", "torch.optim:Adadelta", "torch.optim.Adadelta", "8"),
    OptimizerSpec("adam", "torch.optim:Adam", "torch.optim.Adam", "8"),
    OptimizerSpec("adamw", "torch.optim:AdamW", "torch.optim.AdamW", "8"),
    OptimizerSpec(
        "amsgrad",
        "torch.optim:Adam",
        "torch.optim.Adam(amsgrad=True)",
        "12",
        preset={"amsgrad": True},
    ),
    OptimizerSpec(
        "lbfgs",
        "torch.optim:LBFGS",
        "torch.optim.LBFGS",
        "8 * history_size + 12 (+ scalars)",
        needs_closure=True,
        grouping="flat",
    ),
    OptimizerSpec(
        "adafactor",
        "torch.optim:Adafactor",
        "torch.optim.Adafactor",
        "4 (m + n) / (m n) for a matrix, 4 for vectors",
    ),
    OptimizerSpec(
        "microadam",
        "microadam.optim.micro_adam:MicroAdam",
        "microadam.MicroAdam",
        "0.5 + 4 m density + 4 / Q  (~0.92 at defaults)",
    ),
    OptimizerSpec(
        "adapprox",
        "microadam.optim.adapprox:Adapprox",
        "microadam.Adapprox",
        "4 k (m + n) / (m n) per matrix (+4 first moment); 4 (+4) for vectors",
    ),
    OptimizerSpec(
        "muon",
        "microadam.optim.muon:Muon",
        "microadam.Muon (AdamW for non-matrices)",
        "4 for matrices, 8 for the AdamW part",
        grouping="muon",
    ),
    OptimizerSpec(
        "muonclip",
        "microadam.optim.muonclip:MuonClip",
        "microadam.MuonClip (Muon + QK-clip; AdamW for non-matrices)",
        "4 for matrices, 8 for the AdamW part; + 8 bytes per attention head",
        grouping="muon",
        watches_attention=True,
    ),
    OptimizerSpec(
        "newton",
        "microadam.optim.newton:Newton",
        "microadam.Newton",
        "0 kept (dense n x n Hessian built during step)",
        needs_closure=True,
        grouping="flat",
    ),
    OptimizerSpec(
        "bfgs",
        "microadam.optim.bfgs:BFGS",
        "microadam.BFGS",
        "8 n (dense n x n inverse Hessian)",
        needs_closure=True,
        grouping="flat",
    ),
    OptimizerSpec(
        "adamw8bit",
        "bitsandbytes.optim:AdamW8bit",
        "bitsandbytes.optim.AdamW8bit",
        "2 (+ block absmax)",
        requires="bitsandbytes",
    ),
    OptimizerSpec(
        "galore_adamw",
        "galore_torch:GaLoreAdamW",
        "galore_torch.GaLoreAdamW",
        "8 r / n + 4 r / n per m x n matrix (rank r, m >= n); 8 for the rest",
        defaults={"no_deprecation_warning": True},
        requires="galore_torch",
        grouping="galore",
        closure_without_grad=True,
    ),
    OptimizerSpec(
        "adamw4bit",
        "torchao.optim:AdamW4bit",
        "torchao.optim.AdamW4bit",
        "1 (+ block scales) for tensors of >= 4096 elements; 8 below",
        requires="torchao",
    ),
):
    _register(_spec)


def get_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` of ``name`` (case-insensitive); ``ValueError`` if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"Invalid optimizer name: {name!r} (expected a string)")
    spec = _SPECS.get(name.lower().replace("-", "_"))
    if spec is None:
        raise ValueError(
            f"Invalid optimizer name: {name!r} (expected one of {', '.join(sorted(_SPECS))})"
        )
    if not spec.available():
        raise ValueError(
            f"Optimizer {name!r} needs the optional package {spec.requires!r}, which is not "
            f"installed (pip install 'microadam[peers]')"
        )
    return spec


def all_specs() -> list[OptimizerSpec]:
    """Every registered :class:`OptimizerSpec`, installed or not, in registration order."""
    return list(_SPECS.values())


def list_optimizers(include_unavailable: bool = False) -> list[str]:
    """Registry names, sorted; optional peers only when their package is installed."""
    return sorted(n for n, s in _SPECS.items() if include_unavailable or s.available())


_NORM_TYPES = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
)  # fmt: skip


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Split a module's trainable parameters into decayed and non-decayed groups.

    Biases, the weights of normalization layers (LayerNorm, RMSNorm, BatchNorm, GroupNorm,
    InstanceNorm) and every other parameter with fewer than two dimensions get
    ``weight_decay=0``; everything else (weight matrices, embeddings, convolutions) keeps
    the optimizer's weight decay (``weight_decay`` if given). Empty groups are dropped.
    """
    no_decay_ids = set()
    norm_types = _NORM_TYPES + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or name == "bias" or p.ndim < 2:
                no_decay_ids.add(id(p))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append(
            {"params": decay}
            if weight_decay is None
            else {"params": decay, "weight_decay": weight_decay}
        )
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def galore_param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
) -> list[dict[str, Any]]:
    """GaLore's split: 2-D weight matrices get a low-rank projected group, the rest plain.

    The rank is capped at the smaller side of each matrix's group (matrices smaller than
    ``rank`` on both sides are projected at their own full rank, which GaLore allows).
    Defaults are the GaLore paper's (rank 128, refresh every 200 steps, scale 0.25).
    """
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups: list[dict[str, Any]] = []
    if matrices:
        cap = min(min(p.shape) for p in matrices)
        groups.append({
            "params": matrices, "rank": min(rank, cap), "update_proj_gap": update_proj_gap,
            "scale": scale, "proj_type": proj_type,
        })  # fmt: skip
    if rest:
        groups.append({"params": rest})
    return groups


def create_optimizer(
    name: str,
    params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: a name from :func:`list_optimizers` (case-insensitive, ``-`` or ``_``).
        params_or_model: parameters, param groups, or an ``nn.Module``. A module is split
            by :func:`param_groups` (no weight decay on biases and normalization weights);
            for ``muon``, 2-D hidden matrices go to Muon and everything else to AdamW
            (:func:`microadam.optim.muon.muon_param_groups`); for ``galore_adamw``, 2-D
            matrices get GaLore's projection (:func:`galore_param_groups`, whose ``rank``,
            ``update_proj_gap``, ``scale`` and ``proj_type`` may be passed here); the
            closure-based ``lbfgs``, ``newton`` and ``bfgs`` take one flat group. For
            ``muonclip`` the groups are ``muon``'s and the optimizer then watches every
            attention layer it recognises (``nn.MultiheadAttention``, the bench's TinyGPT
            blocks; see :meth:`microadam.optim.muonclip.MuonClip.watch`); given parameters
            instead of a module, call ``opt.watch(model)`` yourself.
        **hyperparameters: passed unchanged to the optimizer class; an unknown keyword
            raises ``TypeError`` there. For ``galore_adamw``, ``no_deprecation_warning``
            defaults to True (GaLore's own AdamW warns that it is deprecated), and the class
            is a subclass of ``galore_torch.GaLoreAdamW`` whose ``step`` runs the closure
            with gradients enabled, so the usual closure (``zero_grad()``, forward,
            ``backward()``, return the loss) works as with torch.optim.

    Optional peers are imported quietly: their import-time warnings, log messages and
    prints are dropped.

    Example:
        >>> import torch
        >>> from microadam import create_optimizer
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = create_optimizer("adamw", model, lr=1e-3, weight_decay=0.1)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.1, 0.0]
    """
    spec = get_spec(name)
    cls = spec.load()
    for key, value in spec.preset.items():
        if key in hyperparameters and hyperparameters[key] != value:
            raise ValueError(
                f"Invalid {key}: {hyperparameters[key]!r} (the name {spec.name!r} means "
                f"{key}={value!r}; use another name for other values)"
            )
    kwargs = {**spec.defaults, **spec.preset, **hyperparameters}
    if isinstance(params_or_model, nn.Module):
        if spec.grouping == "muon":
            from microadam.optim.muon import muon_param_groups

            params: Any = muon_param_groups(params_or_model)
        elif spec.grouping == "galore":
            galore = {k: kwargs.pop(k) for k in GALORE_KEYS if k in kwargs}
            params = galore_param_groups(params_or_model, **galore)
        elif spec.grouping == "flat":
            params = [p for p in params_or_model.parameters() if p.requires_grad]
        else:
            params = param_groups(params_or_model)
    else:
        params = _as_param_list(params_or_model)
    opt = cls(params, **kwargs)
    if spec.watches_attention and isinstance(params_or_model, nn.Module):
        opt.watch(params_or_model, strict=False)
    return opt


def _as_param_list(params: Any) -> list[Any]:
    """``params`` as a list, refusing what ``torch.optim`` refuses or would misread: a bare
    tensor (iterating it would give its rows), a single dict (its keys), ``None``."""
    expected = "an nn.Module, an iterable of tensors or an iterable of param groups (dicts)"
    if isinstance(params, torch.Tensor):
        raise TypeError(
            f"params_or_model should be {expected}, but got a {torch.typename(params)}; "
            "wrap a single parameter in a list: [param]"
        )
    if isinstance(params, dict):
        raise TypeError(
            f"params_or_model should be {expected}, but got a dict; wrap a single param "
            "group in a list: [group]"
        )
    try:
        return list(params)
    except TypeError:
        raise TypeError(
            f"params_or_model should be {expected}, but got {type(params).__name__}"
        ) from None
