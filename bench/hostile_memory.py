"""Peak memory of reading each hostile file of tests/hostile_files.py, each read in a fresh child.

    python bench/hostile_memory.py [--budget-mb 320] [--against PYTHON ...]

Each child imports mmpack, caps its address space at what it then uses plus
the budget (resource.setrlimit), reads one file with ``mmpack.load`` and
reports how the read ended and its peak resident memory during the read
(VmHWM, the figure ru_maxrss reports, reset through /proc/self/clear_refs
just before the read) above its resident memory just before it.
``--against`` repeats every read with other interpreters (another build of
mmpack) for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from _common import print_table  # noqa: E402
from hostile_files import make_all  # noqa: E402
from limited import run_limited  # noqa: E402

_READ = """
def read():
    mmpack.load({path!r}, indices={indices!r})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=int, default=320)
    parser.add_argument("--against", nargs="*", default=[])
    args = parser.parse_args()
    interpreters = [sys.executable, *args.against]
    with tempfile.TemporaryDirectory(prefix="mmpack-hostile-") as directory:
        cases = make_all(directory)
        rows = []
        for name, case in cases.items():
            row = [name, f"{os.path.getsize(case.path) / 2**20:.1f}", case.expect]
            for python in interpreters:
                result = run_limited(_READ.format(path=case.path, indices=case.indices), args.budget_mb << 20,
                                     python=python)
                outcome = result.outcome if result.outcome != "untyped" else f"untyped {result.error}"
                peak = result.peak_over_start_kib / 1024
                row += [outcome, f"{peak:.0f}"]
            rows.append(row)
    headers = ["file", "MiB", "must be"]
    for i, python in enumerate(interpreters):
        label = "this build" if i == 0 else python
        headers += [f"{label}: got", "peak MiB over start"]
    print(f"address space capped at the imports' plus {args.budget_mb} MiB\n")
    print_table(headers, rows)


if __name__ == "__main__":
    main()
