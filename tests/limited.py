"""Run a read in a subprocess whose address space is capped with ``resource.setrlimit``.

The child imports mmpack first, then caps its address space at what it
already uses plus a budget, then runs the code it was given (a function
``read()`` defined by that code). It reports how ``read()`` ended ("ok", or
the exception's class and whether it is an ``MMPackError``), its resident
memory just before ``read()`` and the peak during it. A crash shows as a
negative return code; running out of the budget as a ``MemoryError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

_CHILD = """
import json, resource, sys, traceback
import mmpack
import mmpack.fileformat, mmpack.repository  # everything a read may use, imported before the cap (mmpack loads lazily)
from mmpack import MMPackError

def address_space():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

{code}

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def reset_peak():
    # Writing 5 to clear_refs resets the peak resident size (VmHWM, what ru_maxrss reports) to
    # the current one: the peak measured afterwards is the read's, not the imports'.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

budget = int(sys.argv[1])
limit = address_space() + budget
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = status("VmRSS")
reset_peak()
try:
    read()
    outcome = {{"outcome": "ok"}}
except MMPackError as exc:
    outcome = {{"outcome": "typed", "error": type(exc).__name__, "message": str(exc)[:300]}}
except BaseException as exc:
    outcome = {{"outcome": "untyped", "error": type(exc).__name__, "message": str(exc)[:300],
               "traceback": traceback.format_exc()[-2000:]}}
outcome["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome["before_kib"] = before
outcome["peak_kib"] = status("VmHWM")
print(json.dumps(outcome))
"""


@dataclass
class Outcome:
    """How the child's ``read()`` ended."""

    returncode: int
    outcome: str  # "ok", "typed" (an MMPackError), "untyped", or "crashed"
    error: str
    message: str
    maxrss_kib: int
    detail: str
    before_kib: int = 0
    peak_kib: int = 0

    @property
    def peak_over_start_kib(self) -> int:
        """Peak resident memory during ``read()`` (VmHWM, reset before it) above the resident
        memory just before it."""
        return max(0, self.peak_kib - self.before_kib)

    @property
    def survived(self) -> bool:
        """Returned verified data or raised a typed error: no crash, no other exception."""
        return self.returncode == 0 and self.outcome in ("ok", "typed")


def run_limited(
    code: str, budget_bytes: int = 768 << 20, timeout: float = 120, python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Run ``code`` (defining ``read()``) in a child with ``budget_bytes`` of address space to spare
    (``python``: the interpreter, another build of mmpack say; ``env``: more environment variables)."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", **(env or {}))
    child = _CHILD.format(code=textwrap.dedent(code))
    process = subprocess.run(
        [python, "-c", child, str(budget_bytes)], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=os.path.dirname(os.path.abspath(__file__)),  # not a source tree: mmpack comes from the installed build
    )
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        return Outcome(process.returncode, "crashed", "", "", 0, process.stderr[-3000:])
    report = json.loads(lines[-1])
    return Outcome(
        process.returncode, report["outcome"], report.get("error", ""), report.get("message", ""),
        report["maxrss_kib"], report.get("traceback", ""), report.get("before_kib", 0), report.get("peak_kib", 0),
    )
