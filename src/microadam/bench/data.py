"""Offline data: text that ships with Python itself, cut into byte-level language-model batches."""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from pathlib import Path

import torch

__all__ = ["ByteCorpus", "file_problem", "read_text_file", "stdlib_text"]


def stdlib_text(max_bytes: int = 2_000_000, seed: int = 0) -> bytes:
    """A deterministic sample of the Python standard library's own source code.

    Files are ordered by a hash of their relative path salted with ``seed`` (so the sample
    mixes modules instead of taking the alphabetically first ones) and concatenated until
    ``max_bytes``. The same Python installation and seed always give the same bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts
    ]
    if not files:
        raise RuntimeError(f"No Python source files found under the standard library at {root}")

    def key(path: Path) -> str:
        return hashlib.sha256(f"{seed}:{path.relative_to(root).as_posix()}".encode()).hexdigest()

    chunks, total = [], 0
    for path in sorted(files, key=key):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a file (``"does not exist"``, ...), else None."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory, not a file"
    if not path.is_file():
        return "is not a regular file"
    if not os.access(path, os.R_OK):
        return "is not readable"
    return None


def read_text_file(text_path: str) -> tuple[bytes, str]:
    """The bytes of a user's text file and how a report names it; ``ValueError`` naming the
    path and what is wrong when it cannot be read."""
    path = Path(text_path)
    problem = file_problem(path)
    if problem:
        raise ValueError(f"Invalid text file: {str(path)!r} {problem}")
    data = path.read_bytes()
    return data, f"{path.name} ({len(data):,} bytes)"


class ByteCorpus:
    """Bytes split into train and validation parts, served as (input, target) batches.

    The last ``val_fraction`` of the bytes is the validation split. Training batches are
    drawn from a ``torch.Generator`` seeded with ``seed``; validation batches are a fixed,
    evenly spaced set of windows, so every optimizer is scored on exactly the same text.
    """

    def __init__(self, data: bytes, context: int, val_fraction: float = 0.1, seed: int = 0):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"Invalid val_fraction: {val_fraction} (expected 0 < val_fraction < 1)"
            )
        cut = int(len(data) * (1 - val_fraction))
        if min(cut, len(data) - cut) < 2 * (context + 1):
            need = math.ceil(2 * (context + 1) / min(val_fraction, 1 - val_fraction))
            raise ValueError(
                f"Invalid data: {len(data)} bytes is too short for context {context} with "
                f"val_fraction {val_fraction} (need at least {need} bytes)"
            )
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.train, self.val = tokens[:cut], tokens[cut:]
        self.context = context
        self.generator = torch.Generator().manual_seed(seed)

    def _windows(self, source: torch.Tensor, starts: torch.Tensor):
        offsets = torch.arange(self.context + 1)
        rows = source[starts.unsqueeze(1) + offsets]
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.train) - self.context - 1
        starts = torch.randint(0, high, (batch_size,), generator=self.generator)
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, num_batches: int):
        """Fixed, evenly spaced windows of the validation split."""
        return self.eval_batches("val", batch_size, num_batches)

    def eval_batches(self, split: str, batch_size: int, num_batches: int):
        """Fixed, evenly spaced windows of ``split`` (``"train"`` or ``"val"``)."""
        source = self.train if split == "train" else self.val
        high = len(source) - self.context - 1
        starts = torch.linspace(0, high, batch_size * num_batches).long()
        for chunk in starts.split(batch_size):
            yield self._windows(source, chunk)
