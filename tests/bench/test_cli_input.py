"""The ``microadam`` command refuses bad input before any work (exit status 2, a message
naming the option and the value) and never ends a run in a raw traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from microadam import NonFiniteGradientError
from microadam.bench import runner
from microadam.bench.grid import check_hyperparameters
from microadam.bench.report import EDGE_NOTE, text_table
from microadam.bench.results import load_results
from microadam.bench.workloads import make_workload
from microadam.cli import main

# A bench that trains for a second or two.
TINY = ["--steps", "2", "--seeds", "1", "--quiet", "--no-plots"]


def _refused(argv: list[str], capsys) -> str:
    """Run ``argv``, expect argparse's refusal (SystemExit 2); return stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _error(argv: list[str], capsys) -> str:
    """Run ``argv``, expect the command's refusal (status 2); return stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("microadam: error: ")
    return err


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "rosenbrock", "--optimizers", "adam", "--lr-grid", "1", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    return out


# -- 1. output paths ------------------------------------------------------------------------


def _commands_with_out(results_dir, out):
    return {
        "bench": ["bench", "iris", "--out", out, *TINY],
        "plot": ["plot", str(results_dir), "--out", out],
        "demo": ["demo", "--out", out],
        "reproduce": ["reproduce", "--quick", "--quiet", "--out", out],
        "speed": ["speed", "--sizes", "1k", "--optimizers", "adamw", "--out", f"{out}/s.json"],
    }


@pytest.mark.parametrize("command", ["bench", "plot", "demo", "reproduce", "speed"])
def test_out_that_is_a_file_is_refused_before_any_work(command, results_dir, tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    err = _error(_commands_with_out(results_dir, str(blocker))[command], capsys)
    assert f"--out: '{blocker}' is a file, not a directory" in err


@pytest.mark.parametrize("command", ["bench", "plot", "demo", "reproduce", "speed"])
def test_out_that_cannot_be_created_is_refused(command, results_dir, tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    out = str(blocker / "sub")
    err = _error(_commands_with_out(results_dir, out)[command], capsys)
    assert "--out: cannot create the directory" in err and "(Not a directory)" in err


def test_speed_out_that_is_a_directory_is_refused(tmp_path, capsys):
    err = _error(
        ["speed", "--sizes", "1k", "--optimizers", "adamw", "--out", str(tmp_path)], capsys
    )
    assert f"--out: '{tmp_path}' is a directory, not a file" in err


# -- 2. zero, negative and empty values -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "iris", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        (["bench", "iris", "--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
        (["bench", "iris", "--lr-grid", "0"], "argument --lr-grid: must be one of [1, 2, 3, 4, 5]"),
        (["bench", "iris", "--eval-every", "0"], "argument --eval-every: must be a positive"),
        (["bench", "iris", "--threads", "-1"], "--threads: must be an integer >= 0, got -1"),
        (["bench", "iris", "--optimizers", ""], "argument --optimizers: expected at least one"),
        (["bench", "iris", "--hidden", "0"], "argument --hidden: must be comma-separated positive"),
        (["bench", "iris", "--batch-size", "0"], "argument --batch-size: must be a positive"),
        (["bench", "rosenbrock", "--dim", "0"], "argument --dim: must be a positive integer"),
        (
            ["bench", "quadratic", "--condition", "0.5"],
            "--condition: must be a number >= 1, got 0.5",
        ),
        (["bench", "lm", "--quick", "--context", "0"], "argument --context: must be a positive"),
        (["bench", "lm", "--d-model", "0"], "argument --d-model: must be a positive integer"),
        (["bench", "lm", "--layers", "0"], "argument --layers: must be a positive integer"),
        (["bench", "lm", "--heads", "0"], "argument --heads: must be a positive integer"),
        (["bench", "lm", "--corpus-bytes", "0"], "argument --corpus-bytes: must be a positive"),
        (["bench", "finetune", "--pretrain-steps", "0"], "argument --pretrain-steps: must be a"),
        (["bench", "iris", "--steps", "ten"], "--steps: must be a positive integer, got 'ten'"),
        (["reproduce", "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        (["reproduce", "--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
        (["reproduce", "--threads", "-2"], "argument --threads: must be an integer >= 0"),
        (["demo", "--threads", "-1"], "argument --threads: must be an integer >= 0"),
        (["memory", "--optimizers", ""], "argument --optimizers: expected at least one"),
        (["speed", "--repeats", "0"], "argument --repeats: must be a positive integer, got 0"),
        (["speed", "--budget", "0"], "argument --budget: must be a positive number, got 0"),
    ],
)
def test_zero_negative_and_empty_values_are_refused(argv, message, capsys):
    assert message in _refused(argv, capsys)


# -- 3. what raised a traceback ---------------------------------------------------------------


def test_unknown_hyperparameter_of_a_variant(capsys):
    err = _error(["bench", "iris", "--optimizers", "microadam[densty=0.1]", *TINY], capsys)
    assert "--optimizers: Invalid optimizer 'microadam[densty=0.1]'" in err
    assert "no hyperparameter 'densty'" in err and "density" in err


def test_unknown_hyperparameter_in_hp(capsys):
    err = _error(["bench", "iris", "--hp", "adamw:betas2=0.9", *TINY], capsys)
    assert "Invalid --hp 'adamw:betas2=0.9': adamw has no hyperparameter 'betas2'" in err


@pytest.mark.parametrize("figures", ["abc", "9", ""])
def test_reproduce_bad_figures(figures, capsys):
    err = _error(["reproduce", "--figures", figures, "--quiet"], capsys)
    assert f"--figures: expected some of [1, 2, 3, 4, 5, 6, 7], got {figures!r}" in err


def test_reproduce_reuse_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    err = _error(["reproduce", "--reuse", str(missing), "--out", str(tmp_path / "o")], capsys)
    assert f"--reuse: '{missing}' does not exist" in err
    assert not (tmp_path / "o").exists()  # refused before anything, the folder included


@pytest.mark.parametrize(
    ("text", "message"),
    [("not json", "is not JSON"), ('{"schema": "microadam.bench/1", "runs": []}',
                                   "is not a reproduce.json")],
)  # fmt: skip
def test_reproduce_reuse_of_a_file_that_is_not_a_reproduce_json(text, message, tmp_path, capsys):
    other = tmp_path / "results.json"
    other.write_text(text)
    err = _error(["reproduce", "--reuse", str(other), "--quiet", "--out", str(tmp_path)], capsys)
    assert f"--reuse: '{other}' {message}" in err


def test_memory_unknown_optimizer(capsys):
    err = _error(["memory", "--optimizers", "foo"], capsys)
    assert "--optimizers: Invalid optimizer name: 'foo'" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["speed", "--optimizers", "foo"], "argument --optimizers: expected some of microadam"),
        (["speed", "--sizes", "foo"], "argument --sizes: Invalid size: 'foo'"),
    ],
)
def test_speed_unknown_optimizer_or_size(argv, message, capsys):
    assert message in _refused(argv, capsys)


# -- 4. a reader that goes away ---------------------------------------------------------------


def test_list_into_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "microadam.cli", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_broken_pipe_exits_1_without_a_traceback(monkeypatch, capsys):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["list"]) == 1
    assert capsys.readouterr().err == ""


def test_ctrl_c_outside_the_runs_exits_130(monkeypatch, capsys):
    from microadam.optim import registry

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "all_specs", interrupt)
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "microadam: interrupted\n"


# -- 5. Ctrl-C during a bench -----------------------------------------------------------------


def test_ctrl_c_keeps_the_runs_that_finished(monkeypatch, tmp_path, capsys):
    real, calls = runner.run_one, []

    def second_run_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_one", second_run_interrupted)
    argv = ["bench", "iris", "--optimizers", "adamw,sgd", "--lrs", "0.01,0.1", *TINY]
    assert main([*argv, "--out", str(tmp_path)]) == 130
    path = tmp_path / "results.json"
    assert f"interrupted: partial results (1 of 4 runs) in {path}" in capsys.readouterr().err
    results = load_results(path)
    assert results["interrupted"] == {"runs_done": 1, "runs_planned": 4}
    assert [(r["optimizer"], r["lr"]) for r in results["runs"]] == [("adamw", 0.01)]
    adamw, sgd = results["optimizers"]
    assert adamw["lrs"] == [0.01] and adamw["best_lr"] == 0.01
    assert sgd["status"] == "skipped" and "interrupted" in sgd["reason"]


# -- 6. options of another workload -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["iris", "--dim", "5"],
            "--dim does not apply to iris (its options: --hidden, --batch-size)",
        ),
        (
            ["iris", "--text", "x"],
            "--text does not apply to iris (its options: --hidden, --batch-size)",
        ),
        (
            ["rosenbrock", "--hidden", "3"],
            "--hidden does not apply to rosenbrock (its options: --dim)",
        ),
        (
            ["lm", "--condition", "3"],
            "--condition does not apply to lm (its options: --batch-size, "
            "--text, --context, --d-model, --layers, --heads, "
            "--corpus-bytes)",
        ),
        (
            ["quadratic", "--hidden", "3", "--context", "8"],
            "--hidden, --context do not apply to quadratic (its options: --condition, --dim)",
        ),
    ],
)
def test_options_of_another_workload_are_refused(argv, message, capsys):
    assert message in _error(["bench", *argv, *TINY], capsys)


# -- 7. --text --------------------------------------------------------------------------------


def test_text_that_is_a_directory_or_missing(tmp_path, capsys):
    err = _error(["bench", "lm", "--quick", "--text", str(tmp_path), *TINY], capsys)
    assert f"--text: '{tmp_path}' is a directory, not a file" in err
    missing = tmp_path / "nope.txt"
    err = _error(["bench", "finetune", "--quick", "--text", str(missing), *TINY], capsys)
    assert f"--text: '{missing}' does not exist" in err


# -- 8. dtypes in --hp and variants -----------------------------------------------------------


def test_hp_value_dtype_is_a_torch_dtype(tmp_path):
    argv = ["bench", "iris", "--optimizers", "microadam", "--lr-grid", "1", *TINY]
    argv += ["--hp", "microadam:value_dtype=float32", "--out", str(tmp_path)]
    assert main(argv) == 0
    run = load_results(tmp_path)["runs"][0]
    assert run["status"] == "ok" and run["hyperparameters"]["value_dtype"] == "torch.float32"


def test_dtype_names_parse_for_dtype_keywords_only(capsys):
    for text in ("bfloat16", "torch.bfloat16"):
        hp = check_hyperparameters("microadam", {"value_dtype": text, "rounding": "nearest"}, "x")
        assert hp == {"value_dtype": torch.bfloat16, "rounding": "nearest"}
    assert check_hyperparameters("muon", {"ns_dtype": "float32"}, "x") == {
        "ns_dtype": torch.float32
    }
    err = _error(["bench", "iris", "--hp", "microadam:value_dtype=float33", *TINY], capsys)
    assert "value_dtype='float33' is not a torch dtype" in err


# -- 9. --lrs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lrs", "message"),
    [
        ("abc", "argument --lrs: 'abc' is not a number"),
        ("0", "argument --lrs: learning rates must be positive, got 0"),
        ("0.1,-1", "argument --lrs: learning rates must be positive, got -1"),
    ],
)
def test_bad_lrs(lrs, message, capsys):
    assert message in _refused(["bench", "iris", "--lrs", lrs], capsys)


# -- 10. --version ----------------------------------------------------------------------------


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"microadam {version('microadam')}\n"


# -- 11. a best lr at an edge of its grid -----------------------------------------------------


def _summary(name: str, best_lr: float) -> dict:
    stats = {"median": 1.0, "min": 1.0, "max": 1.0, "n": 1}
    empty = {"median": None, "min": None, "max": None, "n": 0}
    return {
        "optimizer": name, "status": "ok", "reason": None, "best_lr": best_lr, "seeds": 1,
        "diverged": 0, "failed": 0, "train": stats, "val": stats, "val_accuracy": empty,
        "pretrain_val": empty, "state_bytes_per_param": 8.0, "peak_rss_mb": 100.0,
        "median_step_ms": 1.0,
    }  # fmt: skip


def _results(grids: dict[str, tuple[list[float], float]]) -> dict:
    return {
        "workload": {"metric": "loss"},
        "optimizers": [
            {"name": n, "lrs": lrs, "best_lr": best} for n, (lrs, best) in grids.items()
        ],
        "summary": [_summary(n, best) for n, (_, best) in grids.items()],
    }


def test_text_table_flags_a_best_lr_at_an_edge_of_its_grid():
    table = text_table(_results({
        "low": ([0.01, 0.03, 0.1], 0.01),
        "high": ([0.01, 0.03, 0.1], 0.1),
        "middle": ([0.01, 0.03, 0.1], 0.03),
        "single": ([0.05], 0.05),  # one lr (--lrs 0.05, or --hp lr=) is not a grid
    }))  # fmt: skip
    rows = {line.split()[0]: line.split()[1:3] for line in table.splitlines()[2:6]}
    assert rows == {
        "low": ["0.01", "(edge)"],
        "high": ["0.1", "(edge)"],
        "middle": ["0.03", "1"],
        "single": ["0.05", "1"],
    }
    assert table.endswith(EDGE_NOTE)


def test_text_table_has_no_edge_note_when_every_best_lr_is_inside():
    table = text_table(_results({"a": ([0.01, 0.03, 0.1], 0.03), "b": ([0.05], 0.05)}))
    assert "(edge)" not in table and EDGE_NOTE not in table


def test_report_flags_the_edge(tmp_path):
    argv = ["bench", "rosenbrock", "--optimizers", "adam", "--lrs", "1e-9,2e-9", *TINY]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| adam | 2e-09 (edge) |" in report and EDGE_NOTE in report


# -- 13. a diverged run is told by its exception's class --------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NonFiniteGradientError("MicroAdam: non-finite gradient"), "diverged"),
        (RuntimeError("a non-finite something else went wrong"), "failed"),
    ],
)
def test_run_status_follows_the_error_class(error, status, monkeypatch):
    def step(run, device):
        raise error

    monkeypatch.setattr(runner, "_step", step)
    run = runner.run_one(make_workload("rosenbrock"), "adam", {"lr": 0.1}, 0, 3, 3)
    assert run["status"] == status and run["steps_done"] == 0
    assert run["message"] == f"step 1: {error}"


def test_results_file_of_an_interrupted_bench_is_plottable(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", interrupted)
    argv = ["bench", "rosenbrock", "--optimizers", "adam", "--lr-grid", "1", *TINY]
    assert main([*argv, "--out", str(tmp_path)]) == 130
    assert "(0 of 1 runs)" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "again")]) == 0
    report = (tmp_path / "again" / "report.md").read_text()
    assert "Interrupted after 0 of 1 runs" in report
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == []
