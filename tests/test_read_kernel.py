"""The positioned-read kernel (``_native.read_rows``) against a numpy reference.

Random run tables over several files (contiguous and scattered, with
gaps, overlaps in the file, rows of every size from empty to above the
kernel's batch), XOR on and off, hashes on and off, 1 to 4 threads; many
threads calling it at once; bad plans that must raise before any byte moves;
files that end early; and, through an LD_PRELOAD shim, system calls that
are interrupted (EINTR) or return only part of what was asked.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash
from helpers import PREAD_INTERPOSERS, run_with_shim
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpack import IntegrityError, _io, _native

U64 = np.uint64
BATCH = 256 << 10  # the kernel's largest single read, for sizes around it


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three files of random bytes, open for reading: (descriptors, contents)."""
    directory = tmp_path_factory.mktemp("read-kernel")
    rng = np.random.default_rng(7)
    contents, fds = [], []
    for k, size in enumerate((3 * BATCH + 1234, 70_000, 1)):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        path = directory / f"f{k}.bin"
        data.tofile(path)
        contents.append(data)
        fds.append(os.open(path, os.O_RDONLY))
    yield fds, contents
    for fd in fds:
        os.close(fd)


@st.composite
def run_tables(draw, sizes):
    """Runs (file, offset, row_bytes, count) inside files of ``sizes``, laid out back to back (or
    with gaps) in 1-3 destinations, in any order."""
    n_runs = draw(st.integers(0, 40))
    runs = []
    for _ in range(n_runs):
        f = draw(st.integers(0, len(sizes) - 1))
        row_bytes = draw(
            st.one_of(st.integers(0, 64), st.integers(0, 12_000), st.sampled_from([BATCH - 1, BATCH, BATCH + 3]))
        )
        most = sizes[f] // row_bytes if row_bytes else 50
        if most == 0:
            row_bytes, most = 0, 50
        count = draw(st.integers(0, min(most, 30)))
        span = row_bytes * count
        # Neighbours in the file are likely: they exercise merged reads and gaps.
        offset = draw(st.one_of(st.integers(0, sizes[f] - span), st.just(0)))
        runs.append((f, offset, row_bytes, count))
    if runs and draw(st.booleans()):  # a stretch of file-contiguous runs
        f, offset, row_bytes, count = runs[0]
        position = offset + row_bytes * count
        for _ in range(draw(st.integers(1, 6))):
            piece = draw(st.integers(0, 3000))
            n = draw(st.integers(1, 4))
            if position + piece * n > sizes[f]:
                break
            runs.append((f, position, piece, n))
            position += piece * n
    order = draw(st.permutations(range(len(runs))))
    n_dst = draw(st.integers(1, 3))
    placement = [draw(st.integers(0, n_dst - 1)) for _ in runs]
    gaps = [draw(st.integers(0, 100)) for _ in runs]
    return [runs[k] for k in order], n_dst, placement, gaps


def _layout(runs, n_dst, placement, gaps):
    ends = [0] * n_dst
    offsets = []
    for (_, _, row_bytes, count), d, gap in zip(runs, placement, gaps):
        offsets.append(ends[d] + gap)
        ends[d] += gap + row_bytes * count
    rng = np.random.default_rng(len(runs))
    return [rng.integers(0, 256, e + 7, dtype=np.uint8) for e in ends], offsets


def _tables(runs, placement, offsets):
    return (
        np.array([r[0] for r in runs], U64), np.array([r[1] for r in runs], U64),
        np.array([r[2] for r in runs], U64), np.array([r[3] for r in runs], U64),
        np.array(placement, U64), np.array(offsets, U64),
    )


def _reference(contents, runs, dsts, placement, offsets, xor):
    hashes = []
    for (f, offset, row_bytes, count), d, at in zip(runs, placement, offsets):
        span = row_bytes * count
        source = contents[f][offset : offset + span]
        target = dsts[d][at : at + span]
        target[:] = target ^ source if xor else source
        hashes += [
            xxhash.xxh3_64_intdigest(target[r * row_bytes : (r + 1) * row_bytes].tobytes()) for r in range(count)
        ]
    return hashes


@given(st.data(), st.booleans(), st.booleans(), st.sampled_from([1, 2, 4]))
@settings(max_examples=150, deadline=None)
def test_read_rows_matches_the_reference(files, data, xor, with_hashes, threads):
    fds, contents = files
    runs, n_dst, placement, gaps = data.draw(run_tables([len(c) for c in contents]))
    dsts, offsets = _layout(runs, n_dst, placement, gaps)
    expected = [d.copy() for d in dsts]
    expected_hashes = _reference(contents, runs, expected, placement, offsets, xor)
    f_index, file_offsets, row_bytes, counts, d_index, d_offsets = _tables(runs, placement, offsets)
    hashes = np.zeros(int(counts.sum()), U64) if with_hashes else None
    default = _native.max_threads()
    _native.set_max_threads(threads)
    try:
        _native.read_rows(fds, f_index, file_offsets, row_bytes, counts, dsts, d_index, d_offsets, hashes, xor=xor)
    finally:
        _native.set_max_threads(default)
    for got, want in zip(dsts, expected):
        assert np.array_equal(got, want)
    if with_hashes:
        assert hashes.tolist() == expected_hashes


def test_a_large_plan_is_split_across_threads_and_hashed_row_by_row(files):
    fds, contents = files
    data = contents[0]
    row = 9216
    n = len(data) // row
    # Rows in reverse file order into consecutive destination rows, plus the whole file in one run.
    dst = np.zeros(n * row, np.uint8)
    hashes = np.zeros(n, U64)
    rows = np.arange(n, dtype=U64)[::-1].copy()
    _native.read_rows([fds[0]], np.zeros(n, U64), rows * U64(row), np.full(n, row, U64), np.ones(n, U64),
                      [dst], np.zeros(n, U64), np.arange(n, dtype=U64) * U64(row), hashes)
    expected = data[: n * row].reshape(n, row)[::-1]
    assert np.array_equal(dst.reshape(n, row), expected)
    assert hashes.tolist() == [xxhash.xxh3_64_intdigest(r.tobytes()) for r in expected]
    whole = np.zeros(len(data), np.uint8)
    z = np.zeros(1, U64)
    _native.read_rows([fds[0]], z, z, np.array([len(data)], U64), np.ones(1, U64), [whole], z, z)
    assert np.array_equal(whole, data)


def test_the_kernel_is_safe_to_call_from_many_threads_at_once(files):
    fds, contents = files
    data = contents[0]
    row = 1000
    n = len(data) // row
    expected = [xxhash.xxh3_64_intdigest(data[r * row : (r + 1) * row].tobytes()) for r in range(n)]
    barrier = threading.Barrier(8)

    def work(k: int) -> bool:
        barrier.wait()
        ok = True
        rng = np.random.default_rng(k)
        for _ in range(5):
            picks = rng.permutation(n).astype(U64)
            dst = np.empty(n * row, np.uint8)
            hashes = np.empty(n, U64)
            _native.read_rows([fds[0]], np.zeros(n, U64), picks * U64(row), np.full(n, row, U64), np.ones(n, U64),
                              [dst], np.zeros(n, U64), np.arange(n, dtype=U64) * U64(row), hashes)
            want = data[: n * row].reshape(n, row)[picks.astype(np.intp)]
            ok &= np.array_equal(dst.reshape(n, row), want) and hashes.tolist() == [expected[int(p)] for p in picks]
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def _two_runs(fd: int, field: str | None = None, value: int = 0) -> dict:
    """A plan of two valid 16-byte runs into one 32-byte destination, run 1's ``field`` set to ``value``."""
    plan = dict(fds=[fd], fd_index=np.zeros(2, U64), offsets=np.array([0, 16], U64), row_bytes=np.full(2, 16, U64),
                counts=np.ones(2, U64), dst=[np.zeros(32, np.uint8)], dst_index=np.zeros(2, U64),
                dst_offsets=np.array([0, 16], U64), hashes=None)
    if field is not None:
        plan[field] = plan[field].copy()
        plan[field][1] = value
    return plan


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dst_offsets", 17, "(run|segment) 1: destination range"),
        ("counts", 2, "(run|segment) 1: destination range"),
        ("dst_index", 1, "(run|segment) 1: destination buffer index 1 out of range"),
        ("fd_index", 1, "run 1: file index 1 out of range"),
        ("row_bytes", 2**62, "run 1: row_bytes [*] counts overflows|run 1: file range|destination range"),
        ("offsets", 2**63, "run 1: file range"),
        ("offsets", 2**63 - 8, "run 1: file range"),
    ],
)
def test_bad_plans_raise_before_any_byte_moves(files, field, value, message):
    fds, _ = files
    plan = _two_runs(fds[0], field, value)
    if field == "row_bytes":
        plan["counts"] = np.array([1, 8], U64)
    with pytest.raises(ValueError, match=message):
        _native.read_rows(**plan)
    assert not plan["dst"][0].any()  # run 0 was valid, and still nothing was written


def test_bad_tables_and_arguments_are_rejected(files):
    fd = files[0][0]
    with pytest.raises(ValueError, match="hashes has 3 entries; the runs hold 2 rows"):
        _native.read_rows(**dict(_two_runs(fd), hashes=np.zeros(3, U64)))
    with pytest.raises(ValueError, match="counts sum above 64 bits"):
        _native.read_rows(**dict(_two_runs(fd), row_bytes=np.zeros(2, U64), counts=np.full(2, 2**63 + 1, U64)))
    with pytest.raises(ValueError, match="offsets has 1 entries"):
        _native.read_rows(**dict(_two_runs(fd), offsets=np.zeros(1, U64)))
    with pytest.raises(ValueError, match="not a file descriptor"):
        _native.read_rows(**dict(_two_runs(fd), fds=[-1]))
    with pytest.raises(TypeError, match="uint64"):
        _native.read_rows(**dict(_two_runs(fd), offsets=np.zeros(2, np.int64)))
    with pytest.raises(TypeError, match="writable"):
        _native.read_rows(**dict(_two_runs(fd), dst=[b"x" * 32]))


def test_a_file_that_ends_early_is_a_short_read_naming_the_position(files, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    try:
        dst = np.zeros(200, np.uint8)
        z = np.zeros(1, U64)
        with pytest.raises(_native.ShortReadError) as caught:
            _native.read_rows([fd], z, np.array([60], U64), np.array([50], U64), np.ones(1, U64), [dst], z, z)
        assert isinstance(caught.value, EOFError)
        _, file, position, wanted = caught.value.args
        assert (file, position, wanted) == (0, 100, 110)
        with pytest.raises(IntegrityError, match=r"file is truncated: short\.bin ends at byte 100"):
            _io.read_file_rows([fd], z, np.array([60], U64), np.array([50], U64), np.ones(1, U64), [dst], z, z,
                               names=["short.bin"])
    finally:
        os.close(fd)


def test_a_closed_descriptor_is_an_os_error(tmp_path):
    path = tmp_path / "gone.bin"
    path.write_bytes(b"x" * 64)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    z = np.zeros(1, U64)
    with pytest.raises(OSError) as caught:
        _native.read_rows([fd], z, z, np.array([8], U64), np.ones(1, U64), [np.zeros(8, np.uint8)], z, z)
    assert caught.value.errno == errno.EBADF


_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

/* Every third call fails with EINTR; every other call reads at most 1000
   bytes and only its first iovec: the kernel must resume both. */
static ssize_t shim(int fd, const struct iovec* iov, int n, off_t offset) {
    static __thread unsigned calls;
    static ssize_t (*real)(int, const struct iovec*, int, off_t);
    if (!real) real = (ssize_t (*)(int, const struct iovec*, int, off_t))dlsym(RTLD_NEXT, "preadv");
    ++calls;
    if (calls % 3 == 0) { errno = EINTR; return -1; }
    if (calls % 2 == 0 && n > 0) {
        struct iovec first = iov[0];
        if (first.iov_len > 1000) first.iov_len = 1000;
        return real(fd, &first, 1, offset);
    }
    return real(fd, iov, n, offset);
}
""" + PREAD_INTERPOSERS

_SHIM_CHILD = """
import os, sys, numpy as np, xxhash
from mmpack import _native
U64 = np.uint64
path = sys.argv[1]
data = np.fromfile(path, np.uint8)
fd = os.open(path, os.O_RDONLY)
rng = np.random.default_rng(3)
for xor in (False, True):
    for row in (7, 100, 5000, 300_000):
        n = len(data) // row
        picks = np.sort(rng.choice(n, min(n, 40), replace=False)).astype(U64)
        dst = rng.integers(0, 256, len(picks) * row, dtype=np.uint8)
        expected = dst.reshape(-1, row) ^ data[: n * row].reshape(n, row)[picks.astype(np.intp)] if xor else \\
            data[: n * row].reshape(n, row)[picks.astype(np.intp)]
        hashes = np.zeros(len(picks), U64)
        _native.read_rows([fd], np.zeros(len(picks), U64), picks * U64(row), np.full(len(picks), row, U64),
                          np.ones(len(picks), U64), [dst], np.zeros(len(picks), U64),
                          np.arange(len(picks), dtype=U64) * U64(row), hashes, xor=xor)
        assert np.array_equal(dst.reshape(-1, row), expected), (xor, row)
        assert hashes.tolist() == [xxhash.xxh3_64_intdigest(r.tobytes()) for r in expected], (xor, row)
# Chunks of a version 3 section, read by the decoding threads from the file.
import torch
from mmpack import rans
weights = (rng.standard_normal(300 * 500) * 0.05).astype(np.float32).view(np.uint8)
encoded = rans.encode_rows(weights, 300, 2000, torch.float32, 7)
section = os.path.join(os.path.dirname(path), "section.bin")
encoded.data.tofile(section)
jobs = rans.section_jobs([encoded], [7 * 2000], [len(weights)])
out = np.zeros(len(weights), np.uint8)
section_fd = os.open(section, os.O_RDONLY)
rans.decode_files([encoded.data[: encoded.table_length]], [rans.layout_code(torch.float32)], [section_fd], jobs,
                  [out], None)
assert np.array_equal(out, weights)
print("ok")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to build the fault-injecting shim")
def test_interrupted_and_partial_reads_are_resumed(files, tmp_path):
    data = tmp_path / "data.bin"
    np.random.default_rng(9).integers(0, 256, 4 << 20, dtype=np.uint8).tofile(data)
    result = run_with_shim(tmp_path, _SHIM, _SHIM_CHILD, str(data))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
