"""Kill -9 and resume: training with MicroAdam ends bit-identical to an uninterrupted run.

``examples/resumable_training.py`` checkpoints model, optimizer, scheduler, step and RNG
state every few steps with an atomic write. Here it runs once straight through, and once
killed with SIGKILL at a randomly chosen point (seeded) after its checkpoint has passed a
randomly chosen step, then restarted to resume from its last checkpoint and finish. The
final parameters of the two runs must be equal bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "resumable_training.py"
STEPS, EVERY = 120, 7  # checkpoints at 7, 14, ...: a kill rarely lands on one
STEP_DELAY = 0.02  # seconds per step, so the run is slow enough to be killed mid-way
TIMEOUT = 120


def _command(checkpoint: Path, final: Path) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(checkpoint),
        "--final",
        str(final),
        "--steps",
        str(STEPS),
        "--every",
        str(EVERY),
        "--step-delay",
        str(STEP_DELAY),
    ]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _checkpoint_step(path: Path) -> int:
    """The step the checkpoint file reports, 0 when there is none yet."""
    if not path.exists():
        return 0
    # The writer renames whole files into place, so whatever is there loads.
    return int(torch.load(path, weights_only=True)["step"])


def _run(checkpoint: Path, final: Path) -> str:
    proc = subprocess.run(
        _command(checkpoint, final),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, seed):
    rng = random.Random(seed)
    straight_final = tmp_path / "straight_final.pt"
    out = _run(tmp_path / "straight.pt", straight_final)
    assert "resumed" not in out and f"finished at step {STEPS}" in out

    checkpoint, final = tmp_path / "killed.pt", tmp_path / "killed_final.pt"
    wait_for = rng.randrange(EVERY, STEPS // 2)  # kill once the checkpoint is past this
    extra_delay = rng.uniform(0.0, 3 * STEP_DELAY)  # ... and a random part of a step later
    proc = subprocess.Popen(
        _command(checkpoint, final),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while _checkpoint_step(checkpoint) < wait_for:
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint progress"
            time.sleep(0.01)
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL  # really killed, not finished
    killed_at = _checkpoint_step(checkpoint)
    assert wait_for <= killed_at < STEPS
    assert not final.exists()
    # Only the checkpoint (no temporary file of a finished write) may be there... or a
    # temporary one the kill interrupted, which the resumed run ignores.
    leftovers = {p.name for p in tmp_path.iterdir()} - {
        "straight.pt",
        "straight_final.pt",
        "killed.pt",
    }
    assert all(name.startswith(".killed.pt.") for name in leftovers), leftovers

    out = _run(checkpoint, final)
    assert f"resumed from step {killed_at}" in out
    resumed = torch.load(final, weights_only=True)["model"]
    straight = torch.load(straight_final, weights_only=True)["model"]
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
