"""microadam: MicroAdam in portable PyTorch, the classical optimizer canon, and a bench."""

from microadam.memory import state_bytes, state_bytes_per_param
from microadam.optim import (
    BFGS,
    Adapprox,
    MicroAdam,
    Muon,
    MuonClip,
    Newton,
    NonFiniteGradientError,
    OptimizeResult,
    create_optimizer,
    list_optimizers,
    minimize,
    muon_param_groups,
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
    "create_optimizer",
    "list_optimizers",
    "minimize",
    "muon_param_groups",
    "state_bytes",
    "state_bytes_per_param",
]
__version__ = "0.1.0"
