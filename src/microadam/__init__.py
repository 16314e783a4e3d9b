"""microadam: MicroAdam in portable PyTorch, the classical optimizer canon, and a bench."""

from microadam.memory import state_bytes, state_bytes_per_param
from microadam.optim import MicroAdam

__all__ = ["MicroAdam", "state_bytes", "state_bytes_per_param"]
__version__ = "0.1.0"
