"""A failed save leaves nothing behind, and never removes what a published version needs.

Faults come from a store wrapper that makes any call fail, before or after
it took effect (hypothesis picks the call, the error and whether the disk
stays full), from the OS itself (``link(2)`` that succeeds inside a call
that then fails), from an S3 server whose responses get lost, and from a
real full file system (a small tmpfs in a user namespace, where one can be
mounted without privileges).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from faulty_store import Fault, FaultyStore
from helpers import ffnn_models, mixed_models
from hypothesis import given, settings
from hypothesis import strategies as st
from test_repository import retrain

import mmpack
from mmpack import MMPackError, ModelSet, Repository, StorageError
from mmpack.store import LocalStore

DRIVER = os.path.join(os.path.dirname(__file__), "full_disk_driver.py")
HEAD = "catalog/HEAD.json"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A repository with v1 (baseline) and v2 (update on v1), and the sets each holds."""
    root = tmp_path_factory.mktemp("faults") / "repo"
    repo = Repository(root, fsync=False)
    sets = [ModelSet.from_modules(ffnn_models(8))]
    repo.save(sets[0])
    sets.append(retrain(sets[0], [1, 5], [2]))
    repo.save(sets[1], approach="update", base="v1")
    return str(root), sets


def _snapshot(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (temporaries included) and its bytes."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return found


SCENARIOS = {
    "baseline": dict(approach="baseline"),
    "baseline-zstd": dict(approach="baseline", compression="zstd"),
    "update": dict(approach="update", base="v2"),
    "update-zstd-xor": dict(approach="update", base="v2", compression="zstd"),
    "auto": dict(approach="auto", base="v2"),
    "new-architecture": dict(approach="baseline"),
}

FAULTS = st.builds(
    Fault,
    call=st.integers(0, 24),
    kind=st.sampled_from(["ENOSPC", "EROFS", "EIO", "vanished"]),
    when=st.sampled_from(["before", "after"]),
    persistent=st.booleans(),
)


@settings(max_examples=80)
@given(scenario=st.sampled_from(sorted(SCENARIOS)), fault=FAULTS)
def test_a_failed_save_leaves_the_store_as_it_was(history, scenario, fault):
    source, sets = history
    root = os.path.join(tempfile.mkdtemp(prefix="mmpack-faults-"), "repo")
    try:
        shutil.copytree(source, root)
        _check_one_save(root, sets, scenario, fault)
    finally:
        shutil.rmtree(os.path.dirname(root))


def _check_one_save(root: str, sets: list[ModelSet], scenario: str, fault: Fault) -> None:
    store = FaultyStore(LocalStore(root, fsync=False))
    repo = Repository(store=store)
    models = ModelSet.from_modules(mixed_models(3)) if scenario == "new-architecture" else retrain(sets[1], [0, 3], [4])
    before = _snapshot(root)
    store.arm(fault)
    try:
        vid = repo.save(models, **SCENARIOS[scenario])
    except (MMPackError, OSError) as exc:  # what a failing store may cause: typed errors only
        vid, failure = None, exc
    store.arm(None)
    after = _snapshot(root)
    # Nothing that existed was changed or removed: earlier versions keep every object. (The
    # catalog's HEAD is a hint that every commit rewrites.)
    assert {k: after.get(k) for k in before if k != HEAD} == {k: v for k, v in before.items() if k != HEAD}
    added = set(after) - set(before) - {HEAD}
    clean = Repository(root, fsync=False, create=False)
    if vid is not None:
        record = clean.version(vid)
        assert clean.recover(vid).equal(models)
        published = {k for k in added if k.startswith(("catalog/log/", "catalog/checkpoints/"))}
        assert len([k for k in published if k.startswith("catalog/log/")]) == 1
        assert added <= {*published, *(ref.key for ref in record.objects)}
    else:
        written = {key for method, key, _ in store.log if method == "put"}
        deletes_failed = {key for method, key, outcome in store.log if method == "delete" and outcome == "before"}
        unsure = _read_back_failed(store.log)
        allowed = set(deletes_failed)
        if unsure:  # the manifest's fate could not be read back: its objects stay for gc
            allowed |= written | {key for method, key, _ in store.log if method == "put_if_absent"}
        assert added <= allowed, (failure, store.log)
        if not unsure:
            assert clean.versions()[-1].id == "v2", failure
    for vid_, expected in zip(("v1", "v2"), sets):
        assert clean.recover(vid_).equal(expected)
    clean.gc(grace_seconds=0)
    referenced = {ref.key for record in clean.versions() for ref in record.objects}
    assert set(clean.store.list("objects/")) == referenced


def _read_back_failed(log: list[tuple[str, str, str]]) -> bool:
    """Whether a manifest's create-only write failed and reading that manifest back failed too."""
    failed_publications = set()
    for method, key, outcome in log:
        if method == "put_if_absent" and key.startswith("catalog/log/") and outcome != "ok":
            failed_publications.add(key)
        elif method == "get" and key in failed_publications and outcome != "ok":
            return True
    return False



def test_faults_reach_every_step_of_a_save(history, tmp_path):
    # The generated calls cover the whole save: its last call is within the range FAULTS draws from.
    source, sets = history
    shutil.copytree(source, tmp_path / "repo")
    store = FaultyStore(LocalStore(tmp_path / "repo", fsync=False))
    repo = Repository(store=store)
    for scenario, options in SCENARIOS.items():
        store.arm(None)
        models = ModelSet.from_modules(mixed_models(3)) if scenario == "new-architecture" else sets[1]
        repo = Repository(store=store)
        repo.save(models, **options)
        assert 3 <= store.calls <= 24, (scenario, store.log)


def test_a_manifest_linked_before_an_error_is_a_published_version(history, tmp_path, monkeypatch):
    # link(2) succeeded, then the call failed (an NFS reply lost, an unlink of the temporary refused):
    # the version exists, so the save succeeds and its objects stay.
    source, sets = history
    shutil.copytree(source, tmp_path / "repo")
    repo = Repository(tmp_path / "repo", fsync=False)
    real_link = os.link

    def link_then_fail(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if f"{os.sep}catalog{os.sep}log{os.sep}" in os.fspath(dst):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", link_then_fail)
    models = retrain(sets[1], [6], [])
    vid = repo.save(models, approach="update", base="v2")
    monkeypatch.undo()
    assert vid == "v3" and Repository(tmp_path / "repo").recover(vid).equal(models)
    assert Repository(tmp_path / "repo").verify().ok


def test_a_manifest_link_that_fails_removes_the_objects(history, tmp_path, monkeypatch):
    source, sets = history
    shutil.copytree(source, tmp_path / "repo")
    before = _snapshot(str(tmp_path / "repo"))
    repo = Repository(tmp_path / "repo", fsync=False)

    def refuse(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(StorageError, match=r"cannot write catalog/log/0+3.json .*\[ENOSPC\]") as info:
        repo.save(retrain(sets[1], [6], []), approach="update", base="v2", compression="zstd")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _snapshot(str(tmp_path / "repo")) == before


def test_lost_s3_responses_neither_lose_a_version_nor_leave_debris(s3_server, monkeypatch):
    from mmpack.store import s3

    url = s3_server.url("lost")
    repo = Repository(url, storage_options=s3_server.storage_options)
    sets = [ModelSet.from_modules(ffnn_models(6))]
    repo.save(sets[0])
    real_put = s3.S3Client.put
    mode = {}

    def lossy(self, path, content, *, create, token):
        kind = "manifest" if "/catalog/log/" in path else "object" if "/objects/" in path else "other"
        if mode.get(kind) == "after":
            real_put(self, path, content, create=create, token=token)
        if mode.get(kind) in ("before", "after"):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_put(self, path, content, create=create, token=token)

    monkeypatch.setattr(s3.S3Client, "put", lossy)
    keys = lambda: set(repo.store.list("objects/")) | set(repo.store.list("catalog/log/"))  # noqa: E731
    before = keys()
    for failing in ({"object": "before"}, {"object": "after"}, {"manifest": "before"}):
        mode.clear()
        mode.update(failing)
        with pytest.raises(StorageError, match="Connection reset by peer"):
            repo.save(retrain(sets[0], [1], []), approach="update", base="v1", compression="zstd")
        assert keys() == before, failing
    mode.clear()
    mode["manifest"] = "after"  # the server applied it: the version exists
    models = retrain(sets[0], [2], [])
    vid = repo.save(models, approach="update", base="v1")
    monkeypatch.undo()
    fresh = Repository(url, storage_options=s3_server.storage_options, create=False)
    assert fresh.recover(vid).equal(models) and fresh.verify().ok
    assert fresh.gc(grace_seconds=0).objects == 0


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs in a user namespace: Linux only")
def test_saves_on_a_real_full_file_system_leave_nothing_behind(tmp_path):
    if not _unshare_works():
        pytest.skip("this kernel does not let unprivileged users mount a tmpfs in a user namespace")
    mount = tmp_path / "disk"
    mount.mkdir()
    script = f'mount -t tmpfs -o size=24m tmpfs "{mount}" && exec "{sys.executable}" "{DRIVER}" tmpfs "{mount}"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    levels = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [level for level in levels if not level["saved"]]
    # Some levels fail while the object is written, some once it fit (at the manifest), and the
    # last one succeeds; every failure gave back all the space it took, so a smaller save then fits.
    assert levels[-1]["saved"] and {level["failed_at"] for level in failed} == {"object", "manifest"}, levels
    for level in failed:
        assert level["errno"] == errno.ENOSPC and level["type"] == "StorageError", level
        assert level["unchanged"] and level["space_back"], level
        assert level.get("next_small_save", True), level


@pytest.mark.skipif(not hasattr(os, "posix_fallocate") or sys.platform != "linux", reason="RLIMIT_FSIZE: Linux")
def test_saves_cut_short_by_a_file_size_limit_fail_and_leave_nothing(tmp_path):
    # Past the limit a write is cut short, then fails: a writer that ignored the short count would
    # publish a truncated object (it did, before writes were made whole).
    result = subprocess.run([sys.executable, DRIVER, "fsize", str(tmp_path)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["save"] for o in outcomes] == ["raw", "zstd", "update", "file"]
    for outcome in outcomes:
        assert not outcome["saved"] and outcome["unchanged"] and outcome["errno"] == errno.EFBIG, outcome
        assert outcome["type"] == ("OSError" if outcome["save"] == "file" else "StorageError"), outcome


@pytest.mark.parametrize("grace", [float("nan"), float("inf"), -1.0, -1e-9, "3600", True, None])
def test_gc_refuses_grace_periods_that_would_remove_fresh_files(history, tmp_path, grace):
    # NaN compares false with every cut-off: it removed the objects of a save still running elsewhere.
    shutil.copytree(history[0], tmp_path / "repo")
    fresh = tmp_path / "repo" / "objects" / "0123456789abcdef0123.mmpack"
    fresh.write_bytes(b"a save in progress elsewhere")
    with pytest.raises(mmpack.InvalidArgumentError, match="grace_seconds") as info:
        Repository(tmp_path / "repo").gc(grace_seconds=grace)
    assert isinstance(info.value, ValueError) and fresh.exists()
    assert Repository(tmp_path / "repo").gc(grace_seconds=0).objects == 1 and not fresh.exists()
