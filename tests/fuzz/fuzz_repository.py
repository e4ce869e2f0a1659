"""Coverage-guided fuzzing of a repository's own documents with atheris.

    python tests/fuzz/fuzz_repository.py -max_total_time=300 tests/fuzz/corpus-repository

Each input replaces one document of a small repository of format 2 (a
catalog commit, a checkpoint, HEAD, the provenance document or the marker):
its first byte picks the document, the rest is the new content. Signed
documents (commits, checkpoints, HEAD) are re-signed (their checksum line
recomputed), so mutations reach the field checks rather than stopping at the
checksum. Then the repository is opened, listed,
every version recovered (whole, one model, recursively) and hashed, and
verified. Any exception other than an MMPackError, and any exception at all
from ``verify``, is a bug; so is a crash or a hang.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    import mmpack

    # mmpack loads its submodules lazily: import the ones a repository read runs through here,
    # or they would be imported uninstrumented on first use and give the fuzzer no coverage.
    import mmpack.fileformat.reading
    import mmpack.repository.catalog.columns
    import mmpack.repository.catalog.format1
    import mmpack.repository.catalog.format2
    import mmpack.repository.executor
    import mmpack.repository.maintenance
    import mmpack.repository.repo  # noqa: F401
    from mmpack import MMPackError

HERE = pathlib.Path(__file__).parent
CORPUS = HERE / "corpus-repository"


def build(root: pathlib.Path) -> None:
    """The repository under test: Baseline, Update, compressed XOR Update, Provenance (the golden
    repository's training function), and a compressed Baseline."""
    sys.path.insert(0, str(HERE.parent))
    from golden_repositories import write

    write(root)


WORK = pathlib.Path(tempfile.mkdtemp(prefix="mmpack-fuzz-repo-")) / "repo"
build(WORK)
DOCUMENTS = sorted(p.relative_to(WORK).as_posix() for p in WORK.rglob("*")
                   if p.is_file() and (p.suffix == ".json") and not p.name.startswith("."))
PRISTINE = {name: (WORK / name).read_bytes() for name in DOCUMENTS}
sys.path.insert(0, str(HERE.parent))
from golden_repositories import golden_train  # noqa: E402

TRAINING = {"golden_repositories:golden_train": golden_train}


def seed_corpus() -> None:
    CORPUS.mkdir(exist_ok=True)
    if any(CORPUS.iterdir()):
        return
    for k, name in enumerate(DOCUMENTS):
        content = PRISTINE[name]
        if _signed(name):
            content = content.partition(b"\n")[0]
        (CORPUS / f"{k:02d}-{name.replace('/', '_')}").write_bytes(bytes([k]) + content)


def _signed(name: str) -> bool:
    return name.startswith(("versions/", "catalog/"))


def signed(line: bytes) -> bytes:
    return line + f"\nxxh3-64:{mmpack._native.xxh3_64(line):016x}\n".encode()


def exercise() -> None:
    try:
        repo = mmpack.Repository(WORK)
        ids = [r.id for r in repo.versions()]
    except MMPackError:
        ids = [f"v{n}" for n in range(1, 6)]  # what the pristine repository holds
        try:
            repo = mmpack.Repository(WORK)
        except MMPackError:
            return
    for vid in ids:
        for read in (
            lambda: repo.recover(vid, training=TRAINING),
            lambda: repo.recover(vid, indices=[0], training=TRAINING),
            lambda: repo.recover(vid, strategy="recursive", training=TRAINING),
            lambda: repo.hashes(vid),
            lambda: repo.version(vid).describe(),
            lambda: repo.history(2),
            lambda: repo.tag_log(),
        ):
            try:
                read()
            except MMPackError:
                pass
    report = mmpack.Repository(WORK).verify(training=TRAINING)  # must not raise, whatever it finds
    assert isinstance(report.problems, list)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    name = DOCUMENTS[data[0] % len(DOCUMENTS)]
    content = data[1:]
    if _signed(name):
        content = signed(content)
    (WORK / name).write_bytes(content)
    try:
        exercise()
    finally:
        (WORK / name).write_bytes(PRISTINE[name])


if __name__ == "__main__":
    import os

    # Corpus folders as absolute paths: the working directory becomes the repository, whose
    # provenance version references its datasets relative to it.
    argv = [a if a.startswith("-") else os.path.abspath(a) for a in sys.argv]
    os.chdir(WORK)
    seed_corpus()
    sys.argv = argv
    try:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK.parent, ignore_errors=True)
