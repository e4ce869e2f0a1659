"""Readers whose files change under them: the child processes of tests/test_changing_files.py.

    python tests/changing_files.py build TEMPLATE
    python tests/changing_files.py cases TEMPLATE WORK CASES_JSON
    python tests/changing_files.py loop TEMPLATE WORK SECONDS TARGET/MODE...

``build`` writes the template: two model-set files of the same shape
(``a.mmpack``, ``b.mmpack``), a compressed one (``z.mmpack``), a repository
with a Baseline and an update chain (``chain.repo``) and a compressed
repository with XOR updates (``zstd.repo``).

``cases`` runs deterministic cases: each copies the template, starts a
read, changes one file at a fixed point of the read (after the rows of a
``load``, before the hash table is read; between two recoveries of one
``Repository``, whose readers stay open) and classifies what the read
returned. ``loop`` reads each TARGET in a loop for SECONDS while a mutator
*process* changes its files in a loop (MODE: truncate, overwrite, extend,
replace), one TARGET/MODE pair after the other.

Both print one JSON line: how many reads returned verified data, how many
raised typed errors, and every read that returned wrong data or raised an
untyped error. A crash (SIGBUS, say) shows as a negative return code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np
from file_changes import change

import mmpack
from mmpack import MMPackError
from mmpack.fileformat import reading

TARGETS = ("load-full", "load-indices", "load-zstd", "recover-full", "recover-partial", "recover-chain",
           "recover-compressed")
INDICES = [37, 2, 150, 151, 152, 3]


def build(template: str) -> None:
    from mmpack.workloads import ffnn48, make_models, u3_cycle

    os.makedirs(template, exist_ok=True)
    a = mmpack.ModelSet.from_modules(make_models(ffnn48, 200, seed=1))
    b = mmpack.ModelSet.from_modules(make_models(ffnn48, 200, seed=2))
    mmpack.save(a, os.path.join(template, "a.mmpack"))
    mmpack.save(b, os.path.join(template, "b.mmpack"))
    z_setting = mmpack.Compression(codec="zstd", chunk_bytes=16384)
    mmpack.save(a, os.path.join(template, "z.mmpack"), compression=z_setting)
    # (zstd.repo keeps its name from before the rans codec, which it now holds: both codecs are covered)
    for name, setting in (("chain.repo", None), ("zstd.repo", mmpack.Compression(codec="rans", chunk_bytes=16384))):
        repo = mmpack.Repository(os.path.join(template, name), fsync=False)
        ms = a
        vid = repo.save(ms, compression=setting)
        for cycle in range(4 if setting is None else 2):
            ms = u3_cycle(ms, 0.2, seed=cycle + 1)[0]
            vid = repo.save(ms, approach="update", base=vid, compression=setting)
        repo.close()


def _repository(work: str, target: str) -> str:
    return os.path.join(work, "zstd.repo" if target == "recover-compressed" else "chain.repo")


def _version(repo: mmpack.Repository, target: str) -> str:
    ids = [r.id for r in repo.versions()]
    return ids[0] if target == "recover-full" else ids[-1]


def _read(work: str, target: str, repo: mmpack.Repository | None = None) -> mmpack.ModelSet:
    if target.startswith("load"):
        name = "z.mmpack" if target == "load-zstd" else "a.mmpack"
        return mmpack.load(os.path.join(work, name), indices=INDICES if target == "load-indices" else None)
    repo = repo or mmpack.Repository(_repository(work, target))
    indices = INDICES if target == "recover-partial" else None
    return repo.recover(_version(repo, target), indices=indices)


def _files(work: str, target: str) -> list[str]:
    """The files a read of ``target`` reads, the ones a change may hit."""
    if target.startswith("load"):
        return [os.path.join(work, "z.mmpack" if target == "load-zstd" else "a.mmpack")]
    repo = mmpack.Repository(_repository(work, target))
    keys = []
    record = repo.version(_version(repo, target))
    while record is not None:
        keys.append(record.objects[0].key)
        record = repo.version(record.base) if record.base else None
    repo.close()
    return [os.path.join(_repository(work, target), *key.split("/")) for key in keys]


def expected_results(template: str) -> dict[str, list[mmpack.ModelSet]]:
    """Every result a read may return: the data saved (for loads, either file of the same shape)."""
    a = mmpack.load(os.path.join(template, "a.mmpack"))
    b = mmpack.load(os.path.join(template, "b.mmpack"))
    results = {"load-full": [a, b], "load-indices": [a.select(INDICES), b.select(INDICES)], "load-zstd": [a]}
    for target in TARGETS[3:]:
        results[target] = [_read(template, target)]
    return results


class Tally:
    def __init__(self, expected: list[mmpack.ModelSet]) -> None:
        self.expected = expected
        self.verified = self.typed = 0
        self.bad: list[str] = []

    def read(self, action, label: str) -> None:
        try:
            result = action()
        except MMPackError:
            self.typed += 1
            return
        except Exception:  # noqa: BLE001 - an untyped error is what this looks for
            self.bad.append(f"{label}: untyped {traceback.format_exc(limit=3)[-600:]}")
            return
        if any(result.equal(e) for e in self.expected):
            self.verified += 1
        else:
            self.bad.append(f"{label}: returned data that was never saved")

    def report(self) -> dict:
        return {"verified": self.verified, "typed": self.typed, "bad": self.bad}


def run_cases(template: str, work: str, cases: list[dict]) -> dict:
    expected = expected_results(template)
    tallies = {target: Tally(expected[target]) for target in TARGETS}
    original = reading.read_hash_rows
    for number, case in enumerate(cases):
        directory = os.path.join(work, str(number))
        shutil.copytree(template, directory)
        target, rng = case["target"], random.Random(case["seed"])
        files = _files(directory, target)
        path = files[case["which"] % len(files)]
        other = os.path.join(directory, "b.mmpack") if target in ("load-full", "load-indices") else None

        def hit() -> None:
            change(path, case["change"], case["where"], case["size"], rng, other)

        label = json.dumps(case)
        if target.startswith("load"):
            calls = []

            def changing(*args, **kwargs):
                # The rows are read; the hash table is next: change the file in between.
                if not calls:
                    calls.append(1)
                    hit()
                return original(*args, **kwargs)

            reading.read_hash_rows = changing
            try:
                tallies[target].read(lambda: _read(directory, target), label)
            finally:
                reading.read_hash_rows = original
        else:
            repo = mmpack.Repository(_repository(directory, target))
            tallies[target].read(lambda: _read(directory, target, repo), label)  # readers now open
            hit()
            tallies[target].read(lambda: _read(directory, target, repo), label)
            repo.close()
        shutil.rmtree(directory, ignore_errors=True)
    return {t: tally.report() for t, tally in tallies.items() if tally.verified or tally.typed or tally.bad}


_MUTATOR = r"""
import os, random, sys, time
sys.path.insert(0, {here!r})
from file_changes import change
paths, kind, seconds, other = {paths!r}, {kind!r}, {seconds!r}, {other!r}
originals = {{p: open(p, "rb").read() for p in paths}}
rng = random.Random(0)
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    path = rng.choice(paths)
    change(path, kind, rng.random(), rng.randrange(1, 5000), rng, other)
    time.sleep(rng.random() * 0.005)  # long enough for reads to meet the changed file
    # Put the original back, in place (same inode) or by a rename.
    if kind == "replace":
        with open(path + ".back", "wb") as f:
            f.write(originals[path])
        os.replace(path + ".back", path)
    else:
        with open(path, "r+b") as f:
            f.write(originals[path])
            f.truncate(len(originals[path]))
    time.sleep(rng.random() * 0.002)
"""


def run_loop(template: str, work: str, target: str, kind: str, seconds: float,
             expected: dict[str, list[mmpack.ModelSet]]) -> dict:
    directory = os.path.join(work, f"loop-{target}-{kind}")
    shutil.copytree(template, directory)
    files = _files(directory, target)
    other = os.path.join(directory, "b.mmpack") if target in ("load-full", "load-indices") else None
    script = _MUTATOR.format(here=os.path.dirname(os.path.abspath(__file__)), paths=files, kind=kind,
                             seconds=seconds, other=other)
    mutator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    mutator.stdout.readline()  # changing from now on
    tally = Tally(expected[target])
    repo = None
    end = time.monotonic() + seconds
    reads = 0
    while time.monotonic() < end:
        if not target.startswith("load") and (repo is None or reads % 20 == 0):
            if repo is not None:
                repo.close()
            repo = mmpack.Repository(_repository(directory, target))  # also read files renamed in
        tally.read(lambda: _read(directory, target, repo), f"{target}/{kind} read {reads}")
        reads += 1
    if repo is not None:
        repo.close()
    if mutator.wait() != 0:
        tally.bad.append(f"the mutator failed with {mutator.returncode}")
    shutil.rmtree(directory, ignore_errors=True)
    return tally.report()


def main() -> None:
    command = sys.argv[1]
    if command == "build":
        build(sys.argv[2])
        return
    if command == "cases":
        report = run_cases(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        template, work, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
        expected = expected_results(template)
        report = {}
        for pair in sys.argv[5:]:
            target, kind = pair.split("/")
            report[pair] = run_loop(template, work, target, kind, seconds, expected)
    print(json.dumps(report))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
