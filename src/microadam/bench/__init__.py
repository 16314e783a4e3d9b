"""The bench: offline workloads, a runner and reports used by the ``microadam`` command."""
