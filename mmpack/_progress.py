"""A progress line on a terminal, silence elsewhere (pipes, logs, tests)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], label: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """Yield ``items``, redrawing ``label  k/total`` on ``stream`` (stderr) when it is a terminal."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        of = f"/{total}" if total else ""
        stream.write(f"\r{label}  {done}{of}  {time.perf_counter() - start:.1f}s")
        stream.flush()
    stream.write("\r" + " " * (len(label) + 40) + "\r")
    stream.flush()


def step(label: str, stream: TextIO | None = None) -> None:
    """Show what is running now (a terminal only); the next line overwrites it."""
    stream = stream or sys.stderr
    if stream.isatty():
        stream.write(f"\r{label} ...".ljust(70) + "\r")
        stream.flush()
