"""``microadam reproduce`` end to end at tiny settings, and the pieces it is built from."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from microadam.bench.classic import BC, IRIS, Variant, instability, kept_per_tensor
from microadam.bench.classic import train_classifier as train
from microadam.bench.reproduce import FIGURES, step_ratio
from microadam.cli import main
from microadam.optim import registry

pytest.importorskip("sklearn")


def test_reproduce_end_to_end(tmp_path, check_png, monkeypatch):
    # Figure 7 on a tiny model instead of 0.9M to 11M parameters, and without torchao's
    # AdamW4bit, whose torch.compile takes 10-30 s (tests/optim covers the registry).
    tiny = {"tiny": dict(d_model=16, n_layer=1, n_head=2)}
    monkeypatch.setattr("microadam.bench.memory_table.MODEL_SIZES", tiny)
    names = [n for n in registry.list_optimizers() if n != "adamw4bit"]
    monkeypatch.setattr(registry, "list_optimizers", lambda: names)
    out = tmp_path / "rep"
    argv = ["reproduce", "--quick", "--epochs", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "microadam reproduce --quick --epochs 2" in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(FIGURES) == 7
    for n in FIGURES:
        assert f"## Figure {n}." in report
        assert f"![Figure {n}](fig{n}_" in report
    for png in pngs:
        check_png(png)
    for n in (1, 2, 3, 4, 5):
        section = report.split(f"## Figure {n}.")[1].split("## Figure")[0]
        assert "**The student report observed.**" in section
        assert "**This implementation shows.**" in section
    data = json.loads((out / "reproduce.json").read_text())
    assert data["epochs"] == 2 and data["seeds"] == [0]
    for run in data["runs"]:
        assert run["status"] == "ok"
        assert len(run["train_loss"]) == 3  # before training and after each epoch
    assert "adamw" in data["figures"]["7"]["values"]
    # --reuse redraws everything from reproduce.json without training: the same report.
    again = tmp_path / "again"
    reuse = ["--reuse", str(out / "reproduce.json"), "--out", str(again)]
    assert main([*argv[:-3], *reuse, "--quiet"]) == 0
    body = report.split("## Figure 1.")[1]  # after the command line and the date
    assert (again / "report.md").read_text().split("## Figure 1.")[1] == body
    assert len(list(again.glob("*.png"))) == 7


def test_reproduce_one_figure(tmp_path):
    out = tmp_path / "one"
    assert main(["reproduce", "--figures", "6", "--quick", "--out", str(out), "--quiet"]) == 0
    # Figures need the plot extra; the report and the data come without it.
    figures = ["fig6_rosenbrock.png"] if importlib.util.find_spec("matplotlib") else []
    assert [p.name for p in out.glob("*.png")] == figures
    assert (out / "report.md").is_file()
    assert main(["reproduce", "--figures", "9", "--out", str(out), "--quiet"]) == 2


def test_classifier_runs_are_deterministic_and_follow_the_report():
    ef = Variant("ef", density=0.01, error_feedback=True)
    a, b = train(BC, ef, seed=0, epochs=3), train(BC, ef, seed=0, epochs=3)
    assert a["train_loss"] == b["train_loss"] and a["val_accuracy"] == b["val_accuracy"]
    assert train(BC, ef, seed=1, epochs=3)["train_loss"] != a["train_loss"]
    # 455 training samples in batches of 16, the last short batch kept: 29 steps an epoch.
    assert a["steps"] == 3 * 29
    assert a["num_params"] == 30 * 8 + 8 + 8 * 2 + 2
    assert a["kept_per_tensor"] == [3, 1, 1, 1]
    assert a["effective_density"] == pytest.approx(6 / 266)
    iris = train(IRIS, Variant("adam", "adam"), seed=0, epochs=1)
    assert iris["num_params"] == 15 and iris["steps"] == 8  # 120 samples
    assert iris["kept_per_tensor"] == [12, 3]


def test_kept_per_tensor_has_a_floor_of_one():
    assert kept_per_tensor([240, 8, 16, 2], 0.001) == [1, 1, 1, 1]
    assert kept_per_tensor([240, 8, 16, 2], 1.0) == [240, 8, 16, 2]


def test_instability_measures():
    flat = instability([1.0, 0.5, 0.25, 0.125])
    assert flat["spikes"] == 0 and flat["rise"] == 0.0 and flat["ratio"] == 1.0
    spiky = instability([1.0, 0.01, 0.05, 0.008, 0.3])
    assert spiky["spikes"] == 2 and spiky["last_spike"] == 4
    assert spiky["rise"] == pytest.approx(0.292) and spiky["rise_epoch"] == 4
    assert spiky["ratio"] == pytest.approx(0.3 / 0.008)
    # Round-off above an exact zero is not a spike; a real rise from zero is.
    assert instability([0.1, 0.0, 1e-7])["spikes"] == 0
    assert instability([0.1, 0.0, 0.01])["ratio"] == math.inf


def test_step_ratio():
    assert step_ratio(1) == pytest.approx(1.0)
    assert step_ratio(10) == pytest.approx(1.0)
    assert step_ratio(10**7) == pytest.approx((1 - 0.9**10) / math.sqrt(1 - 0.999**10))
    assert step_ratio(10**7) == pytest.approx(6.53, abs=0.01)
    assert step_ratio(10**7, (0.9, 0.99)) == pytest.approx(2.11, abs=0.01)
