"""The examples a user copies must run and do what they say."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_loop_resumes_identically(capsys):
    runpy.run_path(str(EXAMPLES / "train_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "identical: True" in out


def _load(name: str) -> dict:
    """The example's globals, without running its ``__main__`` block."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{name[:-3]}")


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_plain_loop_scheduler_drives_micro_adam(tensor_lr, capsys):
    example = _load("plain_loop_scheduler.py")
    steps, base_lr = 80, 1e-2
    argv = ["--steps", str(steps), "--lr", str(base_lr), "--log-every", "0"]
    out = example["main"]([*argv, "--tensor-lr"] if tensor_lr else argv)
    records = out["records"]
    assert "resumed run identical: True" in capsys.readouterr().out
    assert out["identical"]
    # The lr each step used is LambdaLR's warmup + cosine value, not the constructor's.
    factor = example["warmup_cosine"](steps // 10, steps)
    for r in records:
        assert r["lr"] == pytest.approx(base_lr * factor(r["step"]), rel=1e-6, abs=1e-12)
    assert [r["lr"] for r in out["resumed"]] == [r["lr"] for r in records[steps // 2 :]]
    # ... and it takes effect: lr 0 (first warmup step) moves nothing, and the change of
    # a step is proportional to its lr while the lr varies by orders of magnitude.
    assert records[0]["lr"] == 0.0 and records[0]["change"] == 0.0
    ratios = [r["change"] / r["lr"] for r in records if r["lr"] > 1e-5]
    lrs = [r["lr"] for r in records if r["lr"] > 1e-5]
    assert max(lrs) / min(lrs) > 100 and max(ratios) / min(ratios) < 10
    losses = [r["loss"] for r in records]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_hf_trainer_example_trains_a_small_gpt2(monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "WANDB_MODE": "disabled",
    }.items():
        monkeypatch.setenv(key, value)
    example = _load("hf_trainer.py")
    losses = example["main"](
        ["--steps", "24", "--batch-size", "8", "--seq-len", "32", "--log-every", "4"]
    )
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5  # from about ln(256) = 5.5 for random bytes
    assert "bytes per parameter" in capsys.readouterr().out
