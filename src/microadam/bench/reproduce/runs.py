"""Running the experiments: each classifier run trained once and shared by the figures that
show it, the Rosenbrock paths and the state-bytes table; or all of them taken from an
earlier ``reproduce.json`` (``--reuse``) instead of computed again."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from microadam.bench.classic import Setup, Variant, train_classifier
from microadam.bench.data import file_problem
from microadam.bench.progress import Progress
from microadam.bench.reproduce.experiments import PANELS, rosenbrock_optimizers, steps_per_epoch

__all__ = ["Runs", "config_key", "read_saved", "rosenbrock_runs", "round_floats"]

# What Runs.preload reads of each saved run.
_SAVED_RUN_KEYS = ("setup", "config", "seed", "epochs")


def round_floats(obj: Any) -> Any:
    """Six significant digits (keeps reproduce.json small); non-finite numbers -> None."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: round_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v) for v in obj]
    return obj


def read_saved(path: str | Path) -> dict[str, Any]:
    """An earlier ``reproduce.json``, checked to be one (``ValueError`` saying what is wrong)
    before anything is trained."""
    problem = file_problem(path)
    if problem:
        raise ValueError(f"{str(path)!r} {problem}")
    try:
        document = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not JSON ({err})") from None
    runs = document.get("runs") if isinstance(document, dict) else None
    if (
        not isinstance(runs, list)
        or not isinstance(document.get("figures"), dict)
        or not all(isinstance(r, dict) and all(k in r for k in _SAVED_RUN_KEYS) for r in runs)
    ):
        raise ValueError(
            f"{str(path)!r} is not a reproduce.json (expected the 'figures' and 'runs' that "
            "microadam reproduce writes)"
        )
    return document


def config_key(config: dict[str, Any]) -> tuple:
    """What determines a run, rounded as in reproduce.json (so a saved run is found again)."""
    items = ((k, json.dumps(round_floats(v))) for k, v in config.items() if k != "label")
    return tuple(sorted(items))


class Runs:
    """Train each (setup, variant, seed) once and hand it to every figure that shows it;
    run figures 6 and 7 unless a reused reproduce.json has them."""

    def __init__(self, epochs: int, seeds: Sequence[int], progress: Progress | None = None):
        self.epochs, self.seeds, self.progress = epochs, tuple(seeds), progress
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.data: dict[str, Any] = {}
        self.saved: dict[str, Any] = {}  # the figures of a reused reproduce.json

    def key(self, setup: Setup, variant: Variant, seed: int) -> tuple:
        return (setup.label, config_key(asdict(variant)), seed, self.epochs)

    def preload(self, document: dict[str, Any]) -> None:
        """Reuse what an earlier reproduce.json holds: its runs (same setup, settings, seed
        and epochs) and its Rosenbrock and state-bytes figures."""
        for r in document.get("runs", []):
            self.cache[(r["setup"], config_key(r["config"]), r["seed"], r["epochs"])] = r
        self.saved = document.get("figures", {})

    def get(self, setup: Setup, variant: Variant) -> list[dict[str, Any]]:
        out = []
        for seed in self.seeds:
            key = self.key(setup, variant, seed)
            if key not in self.cache:
                if setup.label not in self.data:
                    self.data[setup.label] = setup.data()
                progress = self.progress or Progress(0, enabled=False)
                progress.set_status(f"{setup.dataset} {variant.label} seed {seed}")
                run = train_classifier(
                    setup, variant, seed, self.epochs, data=self.data[setup.label],
                    on_epoch=progress.update,
                )  # fmt: skip
                done = (len(run["train_loss"]) - 1) * steps_per_epoch(setup)
                planned = self.epochs * steps_per_epoch(setup)
                if done < planned:
                    progress.update(planned - done)
                self.cache[key] = round_floats(run)
            out.append(self.cache[key])
        return out

    def planned_steps(self, figures: Sequence[int]) -> int:
        seen, total = set(), 0
        for f in figures:
            for panel in PANELS.get(f, ()):
                for v in panel.variants:
                    for seed in self.seeds:
                        k = self.key(panel.setup, v, seed)
                        if k not in seen and k not in self.cache:
                            seen.add(k)
                            total += self.epochs * steps_per_epoch(panel.setup)
        return total

    def rosenbrock(self, steps: int) -> dict[str, dict[str, Any]]:
        """Figure 6's paths of ``steps`` steps: saved ones of that length, else run now."""
        saved = self.saved.get("6")
        if saved and len(next(iter(saved.values()))["path"]) == steps + 1:
            return saved
        if self.progress is not None:
            self.progress.set_status("Rosenbrock")
        return rosenbrock_runs(steps)

    def memory_table(self) -> Any:
        """Figure 7's :class:`~microadam.bench.memory_table.MemoryTable`, saved or measured."""
        from microadam.bench.memory_table import MemoryTable, memory_table

        saved = self.saved.get("7")
        if saved:
            return MemoryTable(saved["sizes"], saved["values"], saved["notes"])
        if self.progress is not None:
            self.progress.set_status("state bytes of every optimizer")
        return memory_table()


def rosenbrock_runs(steps: int) -> dict[str, dict[str, Any]]:
    """Each of figure 6's optimizers for ``steps`` steps from Rosenbrock's start, in float64."""
    from microadam.bench.functions import ROSENBROCK_START, rosenbrock

    out = {}
    for name, make in rosenbrock_optimizers(steps).items():
        x = torch.nn.Parameter(torch.tensor(ROSENBROCK_START, dtype=torch.float64))
        opt = make([x])
        path, values = [x.detach().tolist()], []
        for _ in range(steps):
            loss = rosenbrock(x)
            values.append(loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            path.append(x.detach().tolist())
        final = rosenbrock(x.detach()).item()
        dist = math.dist(path[-1], (1.0, 1.0))
        out[name] = {"path": path, "values": [*values, final], "final": final, "distance": dist}
    return out
