"""The fine-tuning workload: pretraining once (cached), fine-tuning from the checkpoint with
warm-up and linear decay, and the forgetting metric, through the runner and the CLI."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from microadam.bench.finetune import (
    FinetuneConfig,
    FinetuneWorkload,
    pretrained_weights,
    pydoc_topics_text,
    warmup_linear_decay,
)
from microadam.bench.lm import LMConfig
from microadam.bench.report import summary_rows, text_table
from microadam.bench.runner import run_bench, run_one
from microadam.bench.workloads import FunctionWorkload, Task
from microadam.cli import main

TINY_MODEL = LMConfig(
    context=16, d_model=16, n_layer=1, n_head=2, batch_size=4, corpus_bytes=20_000,
    eval_batches=1,
)  # fmt: skip
TINY = FinetuneConfig(model=TINY_MODEL, pretrain_steps=5, pretrain_warmup=2)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROADAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_warmup_linear_decay():
    total, warmup = 10, 3
    got = [warmup_linear_decay(i, total, warmup) for i in range(total + 1)]
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert got[3:] == pytest.approx([(total - i) / (total - warmup) for i in range(3, 11)])
    assert got[-1] == 0.0


def test_pydoc_topics_text_is_english_help():
    text = pydoc_topics_text()
    assert len(text) > 100_000 and b"The " in text and b"def " in text


def test_pretraining_is_cached_by_its_settings(cache):
    corpus = b"".join(bytes([i % 251]) * 3 for i in range(8000))
    first, path, trained = pretrained_weights(TINY, corpus, show_progress=False)
    assert trained and path.is_file() and path.parent.parent == cache
    again, path2, trained2 = pretrained_weights(TINY, corpus, show_progress=False)
    assert not trained2 and path2 == path
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other, path3, trained3 = pretrained_weights(
        FinetuneConfig(model=TINY_MODEL, pretrain_steps=6, pretrain_warmup=2), corpus, False
    )
    assert trained3 and path3 != path
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_task_starts_from_the_pretrained_weights_and_reports_forgetting():
    workload = FinetuneWorkload(TINY, show_progress=False)
    task = workload.make_task(seed=1)
    weights = workload.weights()
    for name, p in task.model.state_dict().items():
        assert torch.equal(p, weights[name]), name
    metrics = task.evaluate()
    assert set(metrics) == {"train", "val", "pretrain_val"}
    # Pretrained on the source text, the model knows it better than the new text.
    assert metrics["pretrain_val"] < metrics["val"]
    assert task.lr_scale(0, 100) == pytest.approx(0.1) and task.lr_scale(100, 100) == 0.0


def test_runner_follows_the_task_schedule():
    """SGD on f(x) = x (gradient 1) moves x by exactly the sum of the scheduled lrs."""

    class Linear(FunctionWorkload):
        def make_task(self, seed, device="cpu"):
            base = super().make_task(seed, device)
            x = next(base.model.parameters())

            def loss():
                return x.sum()

            return Task(base.model, loss, None, base.evaluate, lr_scale=schedule)

    def schedule(step, total):
        return warmup_linear_decay(step, total, 3)

    workload = Linear("quadratic", dim=2)
    torch.manual_seed(0)
    start = workload.make_task(0).model.x.detach().clone()
    steps = 10
    run = run_one(workload, "sgd", {"lr": 0.5, "momentum": 0.0}, 0, steps, 5)
    assert run["status"] == "ok"
    # Each step moves x by -lr * scale(step): the first loss is at the start.
    moved = 0.5 * sum(schedule(i, steps) for i in range(steps))
    first_loss = run["curve"]["train_loss"][0]
    assert first_loss == pytest.approx(float(start.sum()))
    last_loss = run["curve"]["train_loss"][-1]
    assert last_loss == pytest.approx(float(start.sum()) - 2 * (moved - 0.5 * schedule(9, 10)))


def test_bench_reports_forgetting_and_the_gap_to_adamw(tmp_path):
    workload = FinetuneWorkload(TINY, show_progress=False)
    results = run_bench(
        workload, ["microadam", "adamw"], steps=6, seeds=[0], lrs=(1e-3,), show_progress=False
    )
    for run in results["runs"]:
        assert run["status"] == "ok"
        assert run["final"]["pretrain_val"] is not None
        assert len(run["evals"]["pretrain_val"]) == len(run["evals"]["val"])
    rows = summary_rows(results)
    table = text_table(results)
    assert "pretrain val bpb" in table and "val - adamw" in table
    adamw = next(r for r in rows if r[0] == "adamw")
    assert adamw[5] == "+0.000"


def test_cli_finetune_quick_tiny(tmp_path, capsys):
    out = tmp_path / "ft"
    argv = [
        "bench", "finetune", "--quick", "--pretrain-steps", "4", "--steps", "4",
        "--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--corpus-bytes", "20000", "--optimizers", "microadam,adamw", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pretrained weights:" in printed and "val - adamw" in printed
    report = (out / "report.md").read_text()
    assert "Pretrain val" in report
    # The figure needs the plot extra; the report comes without it.
    assert (out / "gap_vs_state_bytes.png").is_file() == bool(
        importlib.util.find_spec("matplotlib")
    )


def test_cli_finetune_missing_text_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["bench", "finetune", "--quick", "--text", str(missing)]) == 2
    assert f"--text: '{missing}' does not exist" in capsys.readouterr().err
