"""Optimizers: one module per family."""

from microadam.optim.micro_adam import MicroAdam

__all__ = ["MicroAdam"]
