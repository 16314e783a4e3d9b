"""The finetune-digits workload: the class-group split, the cached pretraining, the new head
on the pretrained body, the frozen old head behind the forgetting metric, and the runner
and CLI around it (tiny hidden sizes, a few steps)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from microadam.bench.finetune_digits import (
    DigitsFinetuneConfig,
    DigitsFinetuneWorkload,
    load_digit_groups,
    pretrained_mlp,
)
from microadam.bench.results import validate_results
from microadam.bench.runner import run_bench, run_one
from microadam.bench.workloads import make_workload
from microadam.cli import main
from microadam.optim.registry import create_optimizer

pytest.importorskip("sklearn")

TINY = DigitsFinetuneConfig(hidden=(8,), pretrain_steps=30)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROADAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def groups():
    return load_digit_groups()


def test_split_is_stratified_deterministic_and_disjoint(groups):
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    # The digits hold no duplicate image: each raw row names one sample.
    index = {row.astype("float32").tobytes(): i for i, row in enumerate(x)}
    assert len(index) == len(x)
    raw = load_digit_groups(standardize=False)
    again = load_digit_groups()
    seen: set[int] = set()
    for name, offset in (("pretrain", 0), ("finetune", 5)):
        data, other, plain = getattr(groups, name), getattr(again, name), getattr(raw, name)
        for field in ("x_train", "y_train", "x_val", "y_val"):
            assert torch.equal(getattr(data, field), getattr(other, field)), (name, field)
        assert torch.equal(data.y_train, plain.y_train) and torch.equal(data.y_val, plain.y_val)
        parts = {}
        for split in ("train", "val"):
            ids = [index[row.tobytes()] for row in getattr(plain, f"x_{split}").numpy()]
            # Labels remapped to 0..4: each is its image's digit minus the group's first.
            assert getattr(plain, f"y_{split}").tolist() == [int(y[i]) - offset for i in ids]
            parts[split] = set(ids)
        # Disjoint, and together exactly the group's images.
        assert not parts["train"] & parts["val"]
        group = {i for i in range(len(y)) if offset <= y[i] < offset + 5}
        assert parts["train"] | parts["val"] == group
        seen |= group
        # Stratified: every class holds its 20% share of the held-out images.
        labels = torch.cat([data.y_train, data.y_val])
        assert sorted(labels.unique().tolist()) == [0, 1, 2, 3, 4]
        for c in range(5):
            n_val, n = int((data.y_val == c).sum()), int((labels == c).sum())
            assert abs(n_val - 0.2 * n) <= 1, (name, c)
    assert seen == set(range(len(y)))
    # Standardized with the training images of both groups: mean 0 there.
    both = torch.cat([groups.pretrain.x_train, groups.finetune.x_train])
    assert both.mean(0).abs().max() < 1e-4
    assert groups.sha256 == again.sha256 and len(groups.sha256) == 16
    # Another split seed is another split.
    assert not torch.equal(load_digit_groups(split_seed=1).pretrain.y_val, groups.pretrain.y_val)


def test_pretraining_is_cached_by_its_settings(cache, groups):
    first, path, trained = pretrained_mlp(TINY, groups, show_progress=False)
    assert trained and path.is_file() and path.parent.parent == cache
    again, path2, trained2 = pretrained_mlp(TINY, groups, show_progress=False)
    assert not trained2 and path2 == path
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    for changed in (
        DigitsFinetuneConfig(hidden=(8,), pretrain_steps=31),
        DigitsFinetuneConfig(hidden=(8,), pretrain_steps=30, pretrain_lr=2e-3),
        DigitsFinetuneConfig(hidden=(8,), pretrain_steps=30, batch_size=16),
    ):
        other, path3, trained3 = pretrained_mlp(changed, groups, show_progress=False)
        assert trained3 and path3 != path
        assert any(not torch.equal(first[k], other[k]) for k in first)
    wider, path4, trained4 = pretrained_mlp(
        DigitsFinetuneConfig(hidden=(9,), pretrain_steps=30), groups, show_progress=False
    )
    assert trained4 and path4 != path and wider["0.weight"].shape == (9, 64)
    # A changed split is another pretraining too.
    split = load_digit_groups(split_seed=1)
    _, path5, trained5 = pretrained_mlp(
        DigitsFinetuneConfig(hidden=(8,), pretrain_steps=30, split_seed=1), split, False
    )
    assert trained5 and path5 != path


def test_default_pretraining_reaches_high_accuracy():
    workload = DigitsFinetuneWorkload(show_progress=False)
    metrics = workload.pretrained_metrics()
    assert metrics["val_accuracy"] > 0.97
    config = workload.config()
    assert config["pretrained"]["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert config["hidden"] == [128, 128] and config["layers"] == [64, 128, 128, 5]
    assert f"val accuracy {100 * metrics['val_accuracy']:.2f}%" in workload.pretrained_summary()


def test_task_starts_from_the_pretrained_body_with_a_new_head():
    workload = DigitsFinetuneWorkload(TINY, show_progress=False)
    weights = workload.weights()
    task = workload.make_task(seed=1)
    model = task.model
    body = model.body.state_dict()
    assert set(body) == {"0.weight", "0.bias"}
    for name, value in body.items():
        assert torch.equal(value, weights[name]), name
    assert torch.equal(model.old_head_weight, weights["2.weight"])
    assert torch.equal(model.old_head_bias, weights["2.bias"])
    # Parameters: body and new head only; the old head is a buffer.
    assert sum(p.numel() for p in model.parameters()) == workload.num_params() == 64 * 8 + 8 + 45
    assert not any(p is model.old_head_weight for p in model.parameters())
    # The new head depends on the run's seed, and is not the old one.
    other = workload.make_task(seed=2).model
    assert not torch.equal(model.head.weight, other.head.weight)
    assert torch.equal(workload.make_task(seed=1).model.head.weight, model.head.weight)
    assert not torch.equal(model.head.weight, weights["2.weight"])

    metrics = task.evaluate()
    assert set(metrics) == {"train", "val", "train_accuracy", "val_accuracy", "pretrain_val"}
    assert all(math.isfinite(v) for v in metrics.values())
    # Before fine-tuning, the forgetting metric is the pretrained model's own loss on 0-4.
    assert metrics["pretrain_val"] == pytest.approx(workload.pretrained_metrics()["val"], rel=1e-6)
    assert task.lr_scale(0, 100) == pytest.approx(0.1) and task.lr_scale(100, 100) == 0.0


@pytest.mark.parametrize("optimizer", ["adamw", "microadam"])
def test_fine_tuning_moves_body_and_new_head_but_not_the_old_head(optimizer):
    workload = DigitsFinetuneWorkload(TINY, show_progress=False)
    weights = workload.weights()
    task = workload.make_task(seed=0)
    head_before = task.model.head.weight.detach().clone()
    before = task.evaluate()
    opt = create_optimizer(optimizer, task.model, lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        task.batch_loss().backward()
        opt.step()
    assert torch.equal(task.model.old_head_weight, weights["2.weight"])
    assert torch.equal(task.model.old_head_bias, weights["2.bias"])
    assert not torch.equal(task.model.body[0].weight, weights["0.weight"])
    assert not torch.equal(task.model.head.weight, head_before)
    after = task.evaluate()
    assert after["val"] < before["val"]
    assert after["pretrain_val"] != before["pretrain_val"]  # the body moved under the old head


def test_run_one_records_forgetting_from_the_pretrained_loss():
    workload = DigitsFinetuneWorkload(TINY, show_progress=False)
    run = run_one(workload, "microadam", {"lr": 1e-2}, 0, 8, 4)
    assert run["status"] == "ok" and run["num_params"] == workload.num_params()
    curve = run["evals"]["pretrain_val"]
    assert curve[0] == pytest.approx(workload.pretrained_metrics()["val"])
    assert len(curve) == 3 and curve[-1] != curve[0]
    # The same seed gives the same run.
    again = run_one(workload, "microadam", {"lr": 1e-2}, 0, 8, 4)
    assert again["curve"]["train_loss"] == run["curve"]["train_loss"]
    assert {k: v for k, v in again["evals"].items() if k != "wall_s"} == {
        k: v for k, v in run["evals"].items() if k != "wall_s"
    }


def test_invalid_settings():
    with pytest.raises(ValueError, match="hidden"):
        DigitsFinetuneWorkload(hidden=(), show_progress=False)
    with pytest.raises(ValueError, match="pretrain_steps"):
        DigitsFinetuneWorkload(pretrain_steps=0, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsFinetuneWorkload(batch_size=0, show_progress=False)


def test_bench_reports_forgetting():
    workload = make_workload("finetune-digits", hidden=(8,), pretrain_steps=30, show_progress=False)
    assert workload.kind == "finetune" and workload.name == "finetune-digits"
    results = run_bench(
        workload, ["microadam", "adamw"], steps=6, seeds=[0], lrs=(1e-3,), show_progress=False
    )
    assert [e["status"] for e in results["optimizers"]] == ["ok", "ok"]
    for run in results["runs"]:
        assert run["status"] == "ok"
        final = run["final"]
        assert final["pretrain_val"] is not None
        assert all(math.isfinite(final[k]) for k in ("train", "val", "val_accuracy"))
        assert len(run["evals"]["pretrain_val"]) == len(run["evals"]["val"])
    assert results["workload"]["config"]["pretrained"]["val_accuracy"] > 0


def test_cli_finetune_digits_quick_tiny(tmp_path, capsys, check_png):
    out = tmp_path / "ftd"
    argv = [
        "bench", "finetune-digits", "--quick", "--hidden", "8", "--batch-size", "16",
        "--pretrain-steps", "20", "--steps", "4", "--optimizers", "microadam,adamw",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained weights:" in printed and "pretrained on digits 0-4" in printed
    assert "val - adamw" in printed and "pretrain val loss" in printed
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    config = results["workload"]["config"]
    assert config["hidden"] == [8] and config["batch_size"] == 16
    assert config["pretrain_steps"] == 20 and results["settings"]["steps"] == 4
    assert len(results["settings"]["seeds"]) == 1  # --quick: the finetune kind's budget
    report = (out / "report.md").read_text()
    assert "Pretrain val" in report and "finetune-digits" in report
    assert (out / "gap_vs_state_bytes.png").is_file()
    for png in out.glob("*.png"):
        check_png(png)


@pytest.mark.parametrize("option", [["--context", "16"], ["--text", "x.txt"], ["--dim", "3"]])
def test_cli_finetune_digits_refuses_options_that_do_not_apply(option, tmp_path, capsys):
    code = main(["bench", "finetune-digits", "--quick", *option, "--out", str(tmp_path)])
    assert code == 2
    assert "not apply to finetune-digits" in capsys.readouterr().err
