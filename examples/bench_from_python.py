"""Run the bench from Python: MicroAdam at two densities against AdamW on digits.

The command line does the same for one configuration per optimizer
(``microadam bench digits --optimizers microadam,adamw``); from Python you can compare
configurations of one optimizer, here MicroAdam's density, and keep the results documents.

    .venv/bin/python examples/bench_from_python.py      # about a minute on a laptop CPU
"""

from __future__ import annotations

from pathlib import Path

import torch

from microadam.bench import plots
from microadam.bench.report import text_table, write_report
from microadam.bench.results import save_results
from microadam.bench.runner import run_bench
from microadam.bench.workloads import make_workload

torch.set_num_threads(1)
workload = make_workload("digits")  # 64-64-10 MLP, 1,437 training / 360 held-out images
for density in (0.01, 0.1):
    out = Path(f"microadam-bench/digits-density-{density:g}")
    results = run_bench(
        workload,
        ["microadam", "adamw"],
        steps=300,
        seeds=[0, 1],
        lr_factors=(1 / 3, 1.0, 3.0),
        extra_hyperparameters={"microadam": {"density": density}},
        command=f"examples/bench_from_python.py (density {density})",
    )
    save_results(results, out / "results.json")
    write_report(results, out, plots.plot_all(results, out))
    print(f"\nMicroAdam density {density:g}:\n{text_table(results)}")
