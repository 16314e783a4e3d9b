"""Optimizers: one module per family, and the registry that names them all."""

from microadam.optim._common import NonFiniteGradientError
from microadam.optim.adapprox import Adapprox
from microadam.optim.bfgs import BFGS
from microadam.optim.micro_adam import MicroAdam
from microadam.optim.minimize import OptimizeResult, minimize
from microadam.optim.muon import Muon, muon_param_groups, zeropower_via_newtonschulz
from microadam.optim.muonclip import MuonClip
from microadam.optim.newton import Newton
from microadam.optim.registry import (
    OptimizerSpec,
    create_optimizer,
    galore_param_groups,
    get_spec,
    list_optimizers,
    param_groups,
)

__all__ = [
    "BFGS",
    "Adapprox",
    "MicroAdam",
    "Muon",
    "MuonClip",
    "Newton",
    "NonFiniteGradientError",
    "OptimizeResult",
    "OptimizerSpec",
    "create_optimizer",
    "galore_param_groups",
    "get_spec",
    "list_optimizers",
    "minimize",
    "muon_param_groups",
    "param_groups",
    "zeropower_via_newtonschulz",
]
