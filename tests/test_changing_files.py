"""A reader survives any change another process makes to its files: typed error or verified data.

Readers run in child processes (tests/changing_files.py), so a SIGBUS or any
other crash shows as a negative return code. Two kinds of cases:

* generated ones (hypothesis): one file of a ``mmpack.load`` (full, with
  ``indices=``, compressed) or of a ``Repository`` recovery (full, partial,
  an update chain, compressed with XOR deltas) is truncated, overwritten in
  place, extended, replaced by a rename, or cut and rewritten, at a cut point
  and size drawn by hypothesis, at a fixed point of the read: after a load
  has read the rows and before it reads the hash table, or between two
  recoveries of one ``Repository`` (whose readers stay open). With a memory
  map, the first cut killed the reader;
* timed ones: a mutator process changes the files in a loop while the
  reader reads in a loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from changing_files import TARGETS
from file_changes import CHANGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "changing_files.py")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("changing") / "template")
    subprocess.run([sys.executable, CHILD, "build", directory], check=True, timeout=300)
    return directory


def _child(*args: str, timeout: float = 300) -> dict:
    result = subprocess.run([sys.executable, CHILD, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"reader died with {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


cases = st.fixed_dictionaries({
    "target": st.sampled_from(TARGETS),
    "change": st.sampled_from(CHANGES),
    "where": st.floats(0, 1, exclude_max=True),
    "size": st.integers(1, 100_000),
    "which": st.integers(0, 10),
    "seed": st.integers(0, 2**32 - 1),
})


@given(st.lists(cases, min_size=10, max_size=20))
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_file_changed_during_a_read_gives_a_typed_error_or_verified_data(template, tmp_path_factory, batch):
    work = str(tmp_path_factory.mktemp("cases"))
    report = _child("cases", template, work, json.dumps(batch))
    bad = [line for tally in report.values() for line in tally["bad"]]
    assert not bad, bad
    assert sum(t["verified"] + t["typed"] for t in report.values()) >= len(batch)


LOOPS = [f"{target}/{mode}" for target in TARGETS for mode in ("truncate", "overwrite", "extend", "replace")]


def test_readers_survive_a_process_changing_their_files_in_a_loop(template, tmp_path):
    # Every target under every kind of change, a third of a second each, in one reader process.
    report = _child("loop", template, str(tmp_path), "0.35", *LOOPS)
    for pair, tally in report.items():
        assert not tally["bad"], (pair, tally["bad"])
        assert tally["verified"] + tally["typed"] > 0, pair


@pytest.mark.slow  # about 6 minutes: pytest -m slow
@pytest.mark.parametrize("pair", LOOPS)
def test_readers_survive_a_process_changing_their_files_for_long(template, tmp_path, pair):
    report = _child("loop", template, str(tmp_path), "8", pair)[pair]
    assert not report["bad"], report["bad"]
    assert report["verified"] > 0, report
