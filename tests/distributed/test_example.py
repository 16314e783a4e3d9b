"""examples/distributed.py runs under torchrun and prints what it checked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "dcp",
            [
                "every rank's MicroAdam state restored exactly: True",
                "resumed run bit-identical to the uninterrupted one: True",
            ],
        )
    ],
)
@pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason=f"FSDP2 (fully_shard) on the CPU needs torch >= 2.7, not {torch.__version__}",
)
def test_example_under_torchrun(mode, expected, launch):
    del launch  # only its skip: torch.distributed and gloo are there
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(ROOT / "examples" / "distributed.py"),
        "--mode",
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in expected:
        assert line in proc.stdout, proc.stdout
