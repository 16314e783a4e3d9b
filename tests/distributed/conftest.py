"""Launching the ranks of a distributed test: one subprocess per rank running worker.py
with torch's env:// variables (what ``torchrun`` sets), gloo on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("worker.py")


def _skip_reason() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard"
    return None


def fsdp_skip_reason() -> str | None:
    """Why FSDP2 cannot run on the CPU with this torch, or None: torch 2.6's fully_shard
    records events on the device's streams, which ``torch.cpu.Stream`` does from 2.7 on."""
    if not hasattr(torch.cpu.Stream, "record_event"):
        return f"FSDP2 (fully_shard) on the CPU needs torch >= 2.7, not {torch.__version__}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, world: int, out: Path, *args: str, timeout: float = 240) -> str:
    """Run ``worker.py MODE OUT ARGS`` on ``world`` ranks; return their combined output.
    Fails the test (with the output) if a rank fails or the run exceeds ``timeout`` s."""
    reason = _skip_reason() or (None if mode == "ddp" else fsdp_skip_reason())
    if reason is not None:
        pytest.skip(reason)
    port = _free_port()
    root = Path(__file__).resolve().parents[2]
    env_base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    procs = []
    for rank in range(world):
        env = {**env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(out), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs, failed = [], False
    for rank, proc in enumerate(procs):
        try:
            text, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            text, _ = proc.communicate()
            text += f"\n[rank {rank} timed out after {timeout} s]"
            failed = True
        failed = failed or proc.returncode != 0
        outputs.append(f"--- rank {rank} (exit {proc.returncode}) ---\n{text}")
    combined = "\n".join(outputs)
    if failed:
        pytest.fail(f"distributed run {mode!r} failed:\n{combined[-6000:]}")
    return combined


@pytest.fixture(name="launch")
def launch_fixture():
    """The :func:`launch` function (skips the test if torch.distributed cannot run)."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return launch
