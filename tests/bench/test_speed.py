"""``microadam speed`` end to end at tiny sizes: the table, the results file, bad input."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from microadam.bench import speed
from microadam.cli import main


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setattr(speed, "MODEL", dict(context=16, d_model=32, n_layer=1, n_head=2))


def test_speed_writes_every_row_with_ratios_to_fused_adamw(tmp_path, tiny_model, capsys):
    out = tmp_path / "speed.json"
    argv = ["speed", "--sizes", "8k,model", "--optimizers", "microadam,microadam_reference,adamw",
            "--repeats", "3", "--warmup", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| x fused AdamW |" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] >= 1 and data["meta"]["torch"]
    rows = data["results"]
    assert [(r["case"], r["optimizer"]) for r in rows] == [
        (case, label)
        for case in ("8k", "model")
        for label in ("adamw_fused", "microadam", "microadam_reference", "adamw")
    ]
    for r in rows:
        assert r["step_ms"] > 0 and r["baseline_ms"] > 0 and r["repeats"] >= 3
        assert r["ratio"] == pytest.approx(r["step_ms"] / r["baseline_ms"])
        if r["optimizer"].startswith("microadam"):
            # 4-bit codes, a bf16 range per 256 elements and a 10-row window at 1%:
            # well under a byte per parameter, the same for both paths.
            assert 0.5 < r["state_bytes_per_param"] < 1.6
        else:
            assert r["state_bytes_per_param"] == pytest.approx(8.0, abs=0.02)  # + step counters
    by_case = {r["case"]: r for r in rows if r["optimizer"] == "adamw_fused"}
    assert by_case["8k"]["num_params"] == 8192 and by_case["8k"]["num_tensors"] == 1
    assert by_case["model"]["num_tensors"] > 5


def test_speed_csv_and_a_peer_that_is_not_installed(tmp_path, tiny_model, monkeypatch):
    # A peer that cannot run here is a row with its reason, not a crash.
    from microadam.optim import registry

    real = registry.get_spec

    def fake(name):
        if name == "adamw8bit":
            raise ImportError("bitsandbytes is not installed")
        return real(name)

    monkeypatch.setattr(registry, "get_spec", fake)
    out = tmp_path / "speed.csv"
    argv = ["speed", "--sizes", "4096", "--optimizers", "microadam,adamw8bit", "--repeats", "3",
            "--warmup", "1", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["adamw_fused", "microadam", "adamw8bit"]
    assert rows[2]["step_ms"] == "" and "bitsandbytes is not installed" in rows[2]["note"]


def test_speed_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["speed", "--optimizers", "adamw9bit", "--out", str(tmp_path / "s.json")])
    assert exc.value.code == 2
    assert "argument --optimizers: expected some of" in capsys.readouterr().err
    for bad in ("0", "1.5", "ten", "2.5x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            speed.parse_size(bad)
    assert speed.parse_size("2.5k") == 2500 and speed.parse_size("1M") == 1_000_000
    with pytest.raises(SystemExit) as exc:
        main(["speed", "--sizes", "huge", "--out", str(tmp_path / "s.json")])
    assert exc.value.code == 2
    assert "argument --sizes: Invalid size: 'huge'" in capsys.readouterr().err
