"""Command-line option checking shared by ``mmpack`` and the benchmark scripts.

Every numeric option is checked where it is parsed, so a bad value is a
one-line usage error (exit status 2) before anything runs or is written,
instead of a traceback from deep inside (``--cycles -1`` used to end in an
``AttributeError``, ``--grace nan`` in a gc that removed fresh files).
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit status 2.

    argparse prints the usage block first; the error alone, with a pointer
    to ``--help``, says the same in one line (subcommand parsers inherit it).

    Example::

        parser = Parser(prog="mmpack")
        parser.add_argument("--runs", type=positive_int)
        parser.parse_args(["--runs", "0"])  # mmpack: error: argument --runs: must be at least 1, got 0 ...
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def _integer(text: str, least: int) -> int:
    try:
        value = int(text, 10)  # also refuses the 4,300-digit strings int() will not convert
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (``--models``, ``--runs``)."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (``--cycles`` of the demo)."""
    return _integer(text, 0)


def _real(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds, zero or more (``gc --grace``: NaN, infinities and negatives refused)."""
    value = _real(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1] (``--rate``: the share of models retrained per cycle)."""
    value = _real(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, got {text!r}")
    return value


def one_line(message: str) -> str:
    """``message`` on one line (client libraries' messages span several)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())



_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def moment(text: str):
    """A point in time: ISO 8601 with a UTC offset (``2026-01-31T00:00:00+00:00``), or an age
    before now such as ``90d``, ``12h``, ``2w`` (``--newer-than`` of ``mmpack prune``)."""
    from datetime import datetime, timedelta, timezone

    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in _UNITS:
        return datetime.now(timezone.utc) - timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (an ISO 8601 time with a UTC offset, or an age like 90d)"
        ) from None
    if found.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset: add one (+00:00) or give an age like 90d")
    return found
