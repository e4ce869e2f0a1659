"""Failures of the medium reach callers as mmpack errors that are also the OSError they wrap.

The built-in stores translate at their boundary: a full disk, a read-only
file system or an I/O error becomes a StorageError keeping its errno and
naming key, store and path; an absent key an ObjectNotFoundError, which is
still the FileNotFoundError the store contract promises; a storage client's
own exceptions (botocore's) a StorageError too, on one line.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid

import numpy as np
import pytest
from helpers import PREAD_INTERPOSERS, ffnn_models, run_with_shim
from hypothesis import given
from hypothesis import strategies as st

import mmpack
from mmpack import MMPackError, ObjectNotFoundError, StorageError
from mmpack.store import FsspecStore, LocalStore
from mmpack.store import local as local_store

ERRNOS = [errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES]


def _failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


# Each store operation and an OS call it cannot do without.
LOCAL_OPERATIONS = {
    "put": (lambda s: s.put("objects/new", b"data"), "write", [(os, "fsync"), (os, "replace")]),
    "put_if_absent": (lambda s: s.put_if_absent("versions/v9.json", b"m"), "write", [(os, "fsync"), (os, "link")]),
    "get": (lambda s: s.get("objects/old"), "read", [(local_store, "open")]),
    "open_reader": (lambda s: s.open_reader("objects/old").__enter__(), "open", [(local_store, "open")]),
    "size": (lambda s: s.size("objects/old"), "read the size of", [(os, "stat")]),
    "modified": (lambda s: s.modified("objects/old"), "read the time of", [(os, "stat")]),
    "delete": (lambda s: s.delete("objects/old"), "delete", [(os, "unlink")]),
    "list": (lambda s: s.list("objects/"), "list", [(os, "listdir")]),
}


@given(st.sampled_from(sorted(LOCAL_OPERATIONS)), st.sampled_from(ERRNOS), st.integers(0, 1))
def test_local_os_failures_become_storage_errors(tmp_path_factory, operation, code, which):
    store = LocalStore(tmp_path_factory.mktemp("store"), fsync=True)
    store.put("objects/old", b"published")
    call, verb, targets = LOCAL_OPERATIONS[operation]
    module, name = targets[which % len(targets)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, _failing(code), raising=False)
        with pytest.raises(StorageError) as info:
            call(store)
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, MMPackError) and error.errno == code
    key = "objects/new" if operation == "put" else "versions/v9.json" if operation == "put_if_absent" else "objects/"
    assert str(error).startswith(f"cannot {verb} {key}") and repr(store) in str(error)
    assert os.strerror(code) in str(error) and errno.errorcode[code] in str(error)
    assert error.filename.startswith(store.root) and isinstance(error.__cause__, OSError)
    # Nothing half-written stays: a failed put leaves the store as it was.
    assert store.get("objects/old") == b"published" and not store.exists("objects/new")
    assert [n for _, _, names in os.walk(store.root) for n in names if n.startswith(".")] == []


def test_real_os_errors_are_translated(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    store.put("a", b"a file")
    with pytest.raises(StorageError, match=r"cannot write a/b .*\[EEXIST\]") as info:
        store.put("a/b", b"under a file")  # its folder would be the file "a"
    assert info.value.errno == errno.EEXIST and not isinstance(info.value, FileExistsError)
    with pytest.raises(StorageError, match=r"cannot read a/b .*Not a directory \[ENOTDIR\]"):
        store.get("a/b")
    with pytest.raises(StorageError, match=r"\[ENOTDIR\]"):
        store.list("a/")
    assert not store.put_if_absent("a", b"other") and store.get("a") == b"a file"  # absent-or-not still answers


def test_reads_through_an_open_reader_are_translated(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    store.put("objects/x", bytes(100))

    class FailingReader:
        def read(self, offset, size, what):
            raise OSError(errno.EIO, "Input/output error")

        read_into = read_segments = size = buffer = read

    with store.open_reader("objects/x") as reader:
        assert reader.read(10, 5, "a field") == bytes(5) and reader.size() == 100
        reader._reader = FailingReader()  # the disk fails under an open object
        with pytest.raises(StorageError, match=r"cannot read objects/x .*Input/output error \[EIO\]"):
            reader.read(0, 4, "a field")


class ClientFailure(Exception):
    """What a storage client raises of its own (botocore's ``NoCredentialsError``, ``EndpointConnectionError``)."""


# Positioned reads of 16 KiB or more fail with EIO: the data reads of a recovery (rows, or the
# chunks the rANS decoder reads itself), not the small reads of headers and hash tables.
_EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>
static ssize_t shim(int fd, const struct iovec* iov, int n, off_t offset) {
    static ssize_t (*real)(int, const struct iovec*, int, off_t);
    if (!real) real = (ssize_t (*)(int, const struct iovec*, int, off_t))dlsym(RTLD_NEXT, "preadv");
    size_t total = 0;
    for (int i = 0; i < n; ++i) total += iov[i].iov_len;
    if (total >= 16384) { errno = EIO; return -1; }
    return real(fd, iov, n, offset);
}
""" + PREAD_INTERPOSERS

_EIO_CHILD = """
import errno, sys
import mmpack
repo = mmpack.Repository(sys.argv[1])
try:
    repo.recover("v1")
except mmpack.StorageError as exc:
    assert exc.errno == errno.EIO and "cannot read objects/" in str(exc), exc
    print("StorageError")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the fault-injecting shim")
@pytest.mark.parametrize("compression", [None, "rans", "zstd"])
def test_an_io_error_under_a_recovery_is_a_storage_error(tmp_path, compression):
    """Reads the kernels make straight from object files (rows of raw objects, chunks the rANS
    decoder reads itself) fail as the store's own reads do."""
    repo = mmpack.Repository(tmp_path / "r", fsync=False)
    repo.save(mmpack.ModelSet.from_modules(ffnn_models(300)), compression=compression)
    repo.close()
    result = run_with_shim(tmp_path, _EIO_SHIM, _EIO_CHILD, str(tmp_path / "r"))
    assert result.returncode == 0 and result.stdout.strip() == "StorageError", result.stderr[-2000:]


@pytest.fixture
def memory_store():
    store = FsspecStore(f"memory://errors-{uuid.uuid4().hex}")
    yield store
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


FSSPEC_OPERATIONS = {
    "put": (lambda s: s.put("objects/new", b"data"), "pipe_file", "write objects/new"),
    "get": (lambda s: s.get("objects/old"), "cat_file", "read objects/old"),
    "range": (lambda s: s.get_range("objects/old", 1, 3), "cat_file", "read objects/old"),
    "size": (lambda s: s.size("objects/old"), "info", "look up objects/old"),
    "list": (lambda s: s.list("objects/"), "ls", "list objects"),
    "delete": (lambda s: s.delete("objects/old"), "rm_file", "delete objects/old"),
    "reader": (lambda s: s.open_reader("objects/old").__enter__().read(0, 4, "head"), "cat_file", "read objects/old"),
}


@given(st.sampled_from(sorted(FSSPEC_OPERATIONS)), st.sampled_from(["oserror", "client", "missing"]))
def test_fsspec_failures_become_storage_errors(operation, kind):
    store = FsspecStore(f"memory://errors-{uuid.uuid4().hex}")
    store.put("objects/old", b"published")
    call, method, action = FSSPEC_OPERATIONS[operation]
    raised = {"oserror": OSError(errno.EIO, "connection reset"),
              "client": ClientFailure("Parameter validation failed:\nInvalid length for parameter Key"),
              "missing": FileNotFoundError(f"{store.root}/objects/old")}[kind]

    def fail(*args, **kwargs):
        raise raised

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.fs, method, fail)
        if kind == "missing" and operation in ("list", "delete"):
            call(store)  # an absent folder lists as empty; deleting an absent key is no error
            return
        if kind == "missing" and operation == "put":
            with pytest.raises(mmpack.RepositoryError, match="does the bucket exist"):
                call(store)
            return
        with pytest.raises(StorageError) as info:
            call(store)
    error = info.value
    assert str(error).startswith(f"cannot {action} in {store!r}: ") and "\n" not in str(error)
    assert isinstance(error, ObjectNotFoundError) == (kind == "missing") == isinstance(error, FileNotFoundError)
    assert error.errno == {"oserror": errno.EIO, "client": errno.EIO, "missing": errno.ENOENT}[kind]
    assert error.__cause__ is raised
    if kind == "client":
        assert "Parameter validation failed: Invalid length for parameter Key [EIO]" in str(error)


def test_a_repository_reports_a_full_disk_with_the_path(tmp_path, monkeypatch):
    repo = mmpack.Repository(tmp_path / "repo", fsync=True)
    ms = mmpack.ModelSet.from_modules(ffnn_models(3))
    monkeypatch.setattr(os, "fsync", _failing(errno.ENOSPC))
    with pytest.raises(StorageError, match=r"cannot write objects/.*No space left on device \[ENOSPC\]") as info:
        repo.save(ms)
    assert info.value.errno == errno.ENOSPC and info.value.filename.startswith(str(tmp_path / "repo"))
    assert repo.store.list("") == ["repository.json"] and repo.store.list("objects/") == []
    assert repo.store.list("catalog/log/") == []


def test_s3_without_a_bucket_or_credentials_is_one_line(s3_server, monkeypatch):
    with pytest.raises(MMPackError, match="'s3://' names no bucket"):
        FsspecStore("s3://")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    store = FsspecStore(s3_server.url("nocreds"), {"client_kwargs": {"endpoint_url": s3_server.endpoint}})
    with pytest.raises(StorageError, match=r"cannot read catalog/HEAD.json in .*Unable to locate credentials \[EIO\]"):
        mmpack.Repository(store=store)


def test_the_store_contract_still_reads_absent_keys_as_file_not_found(tmp_path):
    # Internal code catches FileNotFoundError from the store interface; it must keep working.
    repo = mmpack.Repository(tmp_path / "repo", fsync=False)
    with pytest.raises(mmpack.VersionNotFoundError):
        repo.version("v1")
    assert repo.versions() == [] and repo.gc(grace_seconds=0).objects == 0
    ms = mmpack.ModelSet.from_modules(ffnn_models(2))
    vid = repo.save(ms)
    key = repo.version(vid).objects[0].key
    os.unlink(tmp_path / "repo" / key)
    with pytest.raises(mmpack.RepositoryError, match=f"data object {key} is missing"):
        mmpack.Repository(tmp_path / "repo").recover(vid)
    assert np.array_equal(repo.hashes(vid), ms.hashes())  # cached where it was written
