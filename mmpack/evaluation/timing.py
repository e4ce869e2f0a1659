"""Timing helpers shared by the benchmarks, the evaluation and the demo.

These machines are noisy virtual machines, so every figure is a median of
several runs, and every claim is a ratio against a floor or a peer measured
in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

import mmpack
from mmpack import _native
from mmpack._options import Parser, positive_int


def parse_args(description: str, default_runs: int = 5, argv: list[str] | None = None) -> argparse.Namespace:
    """The options every benchmark takes: --models, --runs, --dir."""
    parser = Parser(description=description)
    parser.add_argument("--models", type=positive_int, default=5000, help="models in the set (default 5000)")
    parser.add_argument(
        "--runs", type=positive_int, default=default_runs, help="timed runs per case; the median is reported"
    )
    parser.add_argument("--dir", default=None, help="directory for files (default: a fresh temporary one)")
    return parser.parse_args(argv)


def median_seconds(
    action: Callable[[], object], runs: int, *, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``action`` over ``runs`` runs; ``setup`` runs untimed before each."""
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    cases: dict[str, Callable[[], object]], runs: int, *, setup: Callable[[str], object] | None = None
) -> dict[str, float]:
    """Median wall time per case, running the cases round-robin.

    Interleaving spreads slow drifts of a shared machine over all contenders
    instead of penalising whichever ran during a bad minute.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, action in cases.items():
            if setup is not None:
                setup(name)
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def prime_memory(megabytes: int = 1536) -> None:
    """Touch and free a large buffer once before timing anything.

    On these VMs the first touch of guest memory that no process has used yet
    costs several times a normal page fault (the host backs it lazily). Every
    contender allocates fresh buffers, so without this the first ones measured
    would pay for it and the comparison would be unfair.
    """
    block = np.empty(megabytes << 20, dtype=np.uint8)
    block.fill(1)
    del block


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, mmpack {mmpack.__version__} (hash path {_native.simd_path()}, "
        f"{_native.max_threads()} kernel threads)"
    )


@contextmanager
def work_dir(path: str | None):
    """A directory for benchmark files, removed afterwards unless the caller named one."""
    if path is not None:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    directory = tempfile.mkdtemp(prefix="mmpack-bench-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def remove(path: str) -> None:
    """Delete a file or directory tree if present (untimed set-up between runs)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def timed(action: Callable[[], object]) -> tuple[object, float]:
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{str(x):<{w}}" if i == 0 else f"{str(x):>{w}}" for i, (x, w) in enumerate(zip(row, widths))))
