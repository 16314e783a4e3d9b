"""Optional fast paths with the same inputs and outputs as the pure functions.

Nothing here is imported by ``import microadam``: a kernel module is imported, and its
native code built or loaded, the first time an optimizer step needs it.

- :mod:`microadam.kernels.micro_adam_cpu`: the fused CPU step of MicroAdam (a C++/OpenMP
  extension against torch, compiled on first use and cached).
"""
