"""``microadam bench`` and ``microadam plot`` end to end, at tiny settings.

Every workload runs through the CLI's ``main`` (a few steps, tiny models); the results file
is checked against its schema, every PNG is decoded, ``report.md`` carries the command, and
two runs with the same seed give identical numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from microadam.bench.results import SCHEMA, load_results, save_results, validate_results
from microadam.bench.runner import base_hyperparameters, lr_values, run_bench
from microadam.bench.workloads import make_workload
from microadam.cli import main, parse_hp

pytest.importorskip("sklearn")

TINY_LM = [
    "--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
    "--batch-size", "4", "--corpus-bytes", "20000",
]  # fmt: skip


def run_cli(tmp_path: Path, workload: str, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / workload
    argv = ["bench", workload, "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def numbers(results: dict) -> list:
    """Everything a run measured except timings and memory (which vary run to run)."""
    keep = []
    for r in results["runs"]:
        keep.append((
            r["optimizer"], r["lr"], r["seed"], r["status"], r["curve"]["train_loss"],
            r["evals"]["train"], r["evals"]["val"], r["final"], r["state_bytes"],
            r["trajectory"],
        ))  # fmt: skip
    return keep


@pytest.mark.parametrize(
    ("workload", "extra"),
    [
        ("rosenbrock", ["--optimizers", "microadam,adam,lbfgs,newton,bfgs", "--steps", "6"]),
        ("quadratic", ["--optimizers", "microadam,sgd,lbfgs", "--steps", "6", "--condition", "10"]),
        ("iris", ["--optimizers", "microadam,adamw,lbfgs,newton", "--steps", "6"]),
        ("breast-cancer", ["--optimizers", "microadam,adafactor,bfgs", "--steps", "6"]),
        ("digits", ["--optimizers", "microadam,sgd", "--steps", "4", "--hidden", "8"]),
        ("lm", ["--optimizers", "microadam,adamw,lbfgs", "--steps", "4", *TINY_LM]),
    ],
)
def test_every_workload_end_to_end(tmp_path, workload, extra, check_png):
    results, out = run_cli(tmp_path, workload, "--seeds", "2", "--lr-grid", "2", *extra)
    validate_results(results)
    assert results["schema"] == SCHEMA
    assert results["command"].startswith(f"microadam bench {workload}")
    assert results["workload"]["name"] == workload
    names = [o["name"] for o in results["optimizers"]]
    assert names == extra[1].split(",")
    steps = results["settings"]["steps"]
    for o in results["optimizers"]:
        if o["status"] == "skipped":
            assert o["reason"]
            continue
        assert len(o["lrs"]) == 2 and len(o["scores"]) == 2
        runs = [r for r in results["runs"] if r["optimizer"] == o["name"]]
        assert len(runs) == 2 * 2  # lrs x seeds: the same budget for everyone
        for r in runs:
            assert r["status"] == "ok", r["message"]
            assert r["curve"]["step"] == list(range(1, steps + 1))
            assert r["evals"]["step"][0] == 0 and r["evals"]["step"][-1] == steps
            assert r["state_bytes"] > 0 or o["name"] in ("sgd", "newton")
            assert r["median_step_ms"] > 0 and r["wall_s"] > 0
            assert math.isfinite(r["final"]["val"])
            if r["peak_rss_mb"] is not None:
                assert r["peak_rss_mb"] > 10
            if workload in ("rosenbrock", "quadratic"):
                assert len(r["trajectory"]) == steps + 1
            else:
                assert r["trajectory"] is None
            if results["workload"]["kind"] == "tabular":
                assert 0.0 <= r["final"]["val_accuracy"] <= 1.0
            if o["needs_closure"]:
                assert r["closure_calls"] >= steps
    summary = {s["optimizer"]: s for s in results["summary"]}
    assert set(summary) == set(names)
    pngs = sorted(out.glob("*.png"))
    expected = {"loss_vs_steps.png", "loss_vs_time.png", "state_bytes.png", "lr_grid.png"}
    if workload in ("rosenbrock", "quadratic"):
        expected.add("trajectories.png")
    assert {p.name for p in pngs} == expected
    for png in pngs:
        check_png(png)
    report = (out / "report.md").read_text()
    assert results["command"] in report
    for png in pngs:
        assert f"({png.name})" in report


def test_lm_skips_closure_methods_with_a_reason(tmp_path):
    results, _ = run_cli(
        tmp_path, "lm", "--optimizers", "adamw,lbfgs,newton", "--steps", "2", "--lr-grid", "1",
        *TINY_LM,
    )  # fmt: skip
    entries = {o["name"]: o for o in results["optimizers"]}
    for name in ("lbfgs", "newton"):
        assert entries[name]["status"] == "skipped"
        assert "closure" in entries[name]["reason"]
    assert {r["optimizer"] for r in results["runs"]} == {"adamw"}


def test_newton_size_limit_is_a_stated_skip():
    wl = make_workload("digits")  # 64-64-10: 4,810 parameters, under the limit
    assert wl.skip_reason("newton", True, wl.num_params()) is None
    big = make_workload("digits", hidden=(128,))
    reason = big.skip_reason("newton", True, big.num_params())
    assert reason is not None and "max_hessian_size=5000" in reason
    assert big.skip_reason("newton", True, big.num_params(), {"hessian": "cg"}) is None


@pytest.mark.slow
def test_same_seed_gives_identical_numbers(tmp_path):
    a, _ = run_cli(tmp_path / "a", "iris", "--optimizers", "microadam,adamw", "--steps", "8",
                   "--seeds", "1", "--lr-grid", "1")  # fmt: skip
    b, _ = run_cli(tmp_path / "b", "iris", "--optimizers", "microadam,adamw", "--steps", "8",
                   "--seeds", "1", "--lr-grid", "1")  # fmt: skip
    assert numbers(a) == numbers(b)
    lm = ["--optimizers", "microadam", "--steps", "3", "--lr-grid", "1", *TINY_LM]
    c, _ = run_cli(tmp_path / "c", "lm", *lm)
    d, _ = run_cli(tmp_path / "d", "lm", *lm)
    assert numbers(c) == numbers(d)
    # ... and another seed gives other numbers.
    e, _ = run_cli(tmp_path / "e", "iris", "--optimizers", "microadam,adamw", "--steps", "8",
                   "--seeds", "2", "--lr-grid", "1")  # fmt: skip
    assert numbers(e)[0] == numbers(a)[0]
    assert numbers(e)[1][4] != numbers(a)[0][4]


def test_divergence_is_recorded_and_the_lr_grid_skips_it(tmp_path):
    results, out = run_cli(
        tmp_path, "rosenbrock", "--optimizers", "sgd", "--lrs", "0.001,1.0", "--steps", "30",
        "--seeds", "1",
    )  # fmt: skip
    runs = {r["lr"]: r for r in results["runs"]}
    assert runs[1.0]["status"] == "diverged" and runs[1.0]["final"] is None
    assert runs[1.0]["message"].startswith("step ")
    assert runs[0.001]["status"] == "ok"
    entry = results["optimizers"][0]
    assert entry["best_lr"] == 0.001 and entry["scores"][1] is None
    assert "diverged" in (out / "report.md").read_text()


def test_plot_redraws_from_the_results_file(tmp_path, capsys, check_png):
    _, out = run_cli(tmp_path, "quadratic", "--optimizers", "adam,newton", "--steps", "5",
                     "--seeds", "1", "--lr-grid", "1", "--no-plots")  # fmt: skip
    assert not list(out.glob("*.png"))
    again = tmp_path / "again"
    assert main(["plot", str(out / "results.json"), "--out", str(again)]) == 0
    names = {p.name for p in again.glob("*.png")}
    assert {"loss_vs_steps.png", "loss_vs_time.png", "state_bytes.png", "trajectories.png"} <= names
    for png in again.glob("*.png"):
        check_png(png)
    assert "adam" in capsys.readouterr().out
    assert (again / "report.md").exists()


def test_text_file_and_hyperparameter_overrides(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    results, _ = run_cli(
        tmp_path, "lm", "--text", str(text), "--optimizers", "microadam", "--steps", "2",
        "--lr-grid", "1", "--hp", "microadam:density=0.5,window_size=3", *TINY_LM[:-2],
    )  # fmt: skip
    assert results["workload"]["config"]["text"].startswith("text.txt")
    hp = results["runs"][0]["hyperparameters"]
    assert hp["density"] == 0.5 and hp["window_size"] == 3 and hp["weight_decay"] == 0.0


def test_variants_of_one_optimizer_side_by_side(tmp_path, capsys):
    results, _ = run_cli(
        tmp_path, "iris", "--optimizers", "microadam,microadam[density=0.5,window_size=4]",
        "--steps", "4", "--seeds", "1", "--lr-grid", "1",
    )  # fmt: skip
    names = [o["name"] for o in results["optimizers"]]
    assert names == ["microadam", "microadam[density=0.5,window_size=4]"]
    assert [o["registry_name"] for o in results["optimizers"]] == ["microadam", "microadam"]
    hp = {r["optimizer"]: r["hyperparameters"] for r in results["runs"]}
    assert "density" not in hp[names[0]]  # the library default, 0.01
    assert hp[names[1]]["density"] == 0.5 and hp[names[1]]["window_size"] == 4
    assert results["runs"][0]["state_bytes"] < results["runs"][1]["state_bytes"]
    argv = ["bench", "iris", "--optimizers", "adamw,adamw", "--quiet", "--steps", "1"]
    assert main(argv) == 2
    assert "appears twice" in capsys.readouterr().err


def test_parse_hp_and_errors(capsys):
    assert parse_hp(["microadam:density=0.05,betas=(0.9, 0.99)", "sgd:nesterov=True"]) == {
        "microadam": {"density": 0.05, "betas": (0.9, 0.99)},
        "sgd": {"nesterov": True},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_hp(["microadam"])
    assert main(["bench", "iris", "--optimizers", "nope", "--quiet", "--steps", "1"]) == 2
    assert "Invalid optimizer name" in capsys.readouterr().err


def test_lr_grids_are_the_same_size_and_centred():
    for name in ("adamw", "microadam", "sgd", "lbfgs"):
        grid = lr_values(name, "tabular", (1 / 3, 1.0, 3.0), None)
        base = base_hyperparameters(name, "tabular")["lr"]
        assert len(grid) == 3 and grid[1] == base and grid[0] < base < grid[2]
    assert lr_values("adamw", "lm", None, (1e-3, 2e-3)) == [1e-3, 2e-3]
    assert base_hyperparameters("lbfgs", "tabular")["max_iter"] == 1
    assert base_hyperparameters("adamw", "lm")["weight_decay"] == 0.0


def test_results_round_trip_and_validation(tmp_path):
    wl = make_workload("rosenbrock")
    results = run_bench(wl, ["adam"], steps=3, seeds=[0], lr_factors=(1.0,), show_progress=False)
    path = save_results(results, tmp_path / "r" / "results.json")
    loaded = load_results(tmp_path / "r")
    # Curves are stored to 6 significant digits (CURVE_DIGITS); final metrics exactly.
    curve = results["runs"][0]["curve"]
    assert loaded["runs"][0]["curve"]["step"] == curve["step"]
    for key in ("train_loss", "wall_s"):
        assert loaded["runs"][0]["curve"][key] == pytest.approx(curve[key], rel=1e-5)
    assert loaded["runs"][0]["final"] == results["runs"][0]["final"]
    assert loaded["summary"][0]["optimizer"] == "adam"
    broken = json.loads(path.read_text())
    del broken["runs"][0]["curve"]
    with pytest.raises(ValueError, match="curve"):
        validate_results(broken)
    broken["schema"] = "other"
    with pytest.raises(ValueError, match="schema"):
        validate_results(broken)


def test_memory_command(capsys):
    assert main(["memory", "--optimizers", "adamw,microadam,lbfgs", "--sizes", "small"]) == 0
    out = capsys.readouterr().out
    assert "| adamw | 8.000 |" in out
    assert "| lbfgs | - |" in out
