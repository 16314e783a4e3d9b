"""Shared checks of the bench tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _check_png(path: Path) -> None:
    """The file decodes as an image with some content (not a blank canvas)."""
    from matplotlib import image

    assert path.stat().st_size > 1000, path
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert float(pixels[..., :3].std()) > 0.01, f"{path} is blank"


@pytest.fixture
def check_png():
    pytest.importorskip("matplotlib")
    return _check_png


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster, and the bench sets it anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
