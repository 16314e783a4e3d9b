"""The torch floor is set once, in pyproject.toml; the pages that state it cannot drift.

Every ``torch >= X`` in README.md, docs/setup.md and pyproject.toml (its comments too) must
be the floor of ``project.dependencies``, and the Makefile's ``FLOOR_TORCH`` (what ``make
test-floor`` installs) must be that release. Features that need a newer torch are written
"torch 2.13 or newer" in the docs, so they are not mistaken for the floor.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
STATED = re.compile(r"(?<![\w-])torch\s*>=\s*(\d+(?:\.\d+)+)")  # not galore-torch


def _release(version: str) -> tuple[int, ...]:
    """``"2.6"`` and ``"2.6.0"`` alike: the numbers without trailing zeros."""
    parts = [int(x) for x in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def floor() -> str:
    """The X of the one ``torch>=X`` requirement in pyproject.toml's dependencies."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    torch_reqs = [r for r in data["project"]["dependencies"] if re.match(r"torch\b", r)]
    assert len(torch_reqs) == 1, torch_reqs
    match = re.fullmatch(r"torch\s*>=\s*(\d+(?:\.\d+)+)", torch_reqs[0].strip())
    assert match, f"expected a plain 'torch>=X' requirement, got {torch_reqs[0]!r}"
    return match.group(1)


@pytest.mark.parametrize("page", ["README.md", "docs/setup.md", "pyproject.toml"])
def test_page_states_the_floor_of_pyproject(page):
    stated = STATED.findall((ROOT / page).read_text(encoding="utf-8"))
    assert stated, f"{page} does not state the torch floor (as 'torch >= {floor()}')"
    assert {_release(v) for v in stated} == {_release(floor())}, (
        f"{page} states torch >= {sorted(set(stated))}, pyproject.toml requires torch>={floor()}"
    )


def test_makefile_floor_venv_installs_the_floor():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^FLOOR_TORCH \?= (\S+)$", makefile, re.MULTILINE)
    assert match, "the Makefile has no 'FLOOR_TORCH ?= X' line"
    assert _release(match.group(1)) == _release(floor()), (
        f"make test-floor installs torch {match.group(1)}, pyproject.toml's floor is {floor()}"
    )
