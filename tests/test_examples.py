"""The examples a user copies must run and do what they say."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_loop_resumes_identically(capsys):
    runpy.run_path(str(EXAMPLES / "train_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "identical: True" in out
