"""The argument types and checks that the ``microadam`` command's subcommands share: each
refuses bad input before any work, naming the option and the value."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "check_out",
    "checked_type",
    "error",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


def error(message: str) -> int:
    """Print ``microadam: error: MESSAGE`` on stderr; the exit status 2."""
    print(f"microadam: error: {message}", file=sys.stderr)
    return 2


def checked_type(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Any:
    """An argparse ``type``: ``convert`` the text, refusing what is not ``ok`` (argparse
    then names the option: ``argument --steps: must be a positive integer, got 0``)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = checked_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked_type(float, lambda v: 0 < v < math.inf, "a positive number")


def check_out(path: Path, option: str, *, file: bool = False) -> str | None:
    """Create the output folder ``path`` (for a ``file``, its folder) now, so that a bad
    ``option`` fails before any work; the error message, or None."""
    folder = path.parent if file else path
    if file and path.is_dir():
        return f"{option}: {str(path)!r} is a directory, not a file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{option}: {str(folder)!r} is a file, not a directory"
    except OSError as err:
        return f"{option}: cannot create the directory {str(folder)!r} ({err.strerror})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option}: the directory {str(folder)!r} is not writable"
    return None
