"""Progress for long runs: a tqdm bar on a terminal if tqdm is installed, else plain lines.

Nothing is shown for work that finishes within ``delay`` seconds. Without a terminal (or
without tqdm) one line goes to stderr every ``every`` seconds.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress"]


class Progress:
    """Count units of work (training steps) toward ``total``."""

    def __init__(
        self, total: int, desc: str = "", enabled: bool = True, delay: float = 3.0,
        every: float = 15.0,
    ):  # fmt: skip
        self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
        self.delay, self.every = delay, every
        self.done, self.start = 0, time.perf_counter()
        self._last_line, self._status = self.start, ""
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=self.total, desc=desc, delay=delay, unit="step", leave=False,
                    dynamic_ncols=True,
                )  # fmt: skip

    def set_status(self, status: str) -> None:
        """What is running now (shown beside the bar or on the next line)."""
        self._status = status
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start >= self.delay and now - self._last_line >= self.every:
            self._last_line = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        frac = min(self.done / self.total, 1.0)
        left = elapsed / frac - elapsed if frac > 0 else float("nan")
        print(
            f"[{self.desc}] {100 * frac:3.0f}%  {self._status}  "
            f"{elapsed:.0f} s elapsed, ~{left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
