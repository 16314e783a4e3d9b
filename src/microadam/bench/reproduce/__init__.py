"""``microadam reproduce``: the founding student report's experiments, on this implementation.

The report trained scikit-learn's iris (a single linear layer on the raw features) and
breast cancer (a 30-8-2 MLP on standardized features) with batch 16, lr 1e-3 and 1000
epochs, and found instability and divergence. The report itself is not part of this
repository: what it observed is known only from the project's issue, whose words
:data:`OBSERVED` quotes. This package reruns its seven figures with its settings
(:mod:`microadam.bench.classic`), draws each as a PNG and writes ``report.md`` stating,
figure by figure, what the report observed and what this implementation shows, with the
numbers measured in the same run. ``quick=True`` runs 50 epochs and one seed.

Modules: :mod:`.experiments` (the settings, figures and variants), :mod:`.runs` (training
each run once; reuse of a ``reproduce.json``), :mod:`.stats` (the numbers over seeds and
the panels' tables), :mod:`.figures` (the PNGs), :mod:`.narrative` (the words) and
:mod:`.command` (:func:`reproduce`, which writes report.md and reproduce.json).
"""

from microadam.bench.reproduce.command import reproduce
from microadam.bench.reproduce.experiments import FIGURES, step_ratio
from microadam.bench.reproduce.narrative import OBSERVED

__all__ = ["FIGURES", "OBSERVED", "reproduce", "step_ratio"]
