"""What every Store backend must do, as a pytest suite a backend's own tests subclass.

Example (a third-party backend's test module)::

    import pytest
    from mmpack.testing import StoreTests

    class TestVaultStore(StoreTests):
        @pytest.fixture
        def store(self, tmp_path):
            yield VaultStore(f"vault://{tmp_path}")   # an empty store

Every test then runs against the backend: missing keys, atomic and
create-only writes, listings, range reads and their errors, temporaries,
concurrent create-only writers. Needs pytest (``pip install "mmpack[test]"``).
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import xxhash

from mmpack import IntegrityError, MMPackError, ObjectNotFoundError
from mmpack.store import CleanupReport, SizedWriter, Store

U64 = np.uint64


class StoreTests:
    """The store contract of ``mmpack/store/base.py``, backend-independent."""

    @pytest.fixture
    def store(self) -> Store:
        raise NotImplementedError("subclasses provide an empty store")

    def test_missing_keys_raise_file_not_found(self, store):
        # FileNotFoundError is the contract; the built-in backends raise mmpack's subclass of it,
        # naming the key.
        for call in (
            lambda: store.get("objects/none.mmpack"),
            lambda: store.size("objects/none.mmpack"),
            lambda: store.modified("objects/none.mmpack"),
            lambda: store.open_reader("objects/none.mmpack").__enter__().size(),
        ):
            with pytest.raises(ObjectNotFoundError, match="objects/none.mmpack") as info:
                call()
            assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, MMPackError)
            assert info.value.errno == errno.ENOENT and "\n" not in str(info.value)
        assert not store.exists("objects/none.mmpack")

    def test_put_takes_bytes_arrays_and_writers(self, store):
        store.put("a/bytes", b"hello")
        store.put("a/array", np.arange(6, dtype="<u2"))
        store.put("a/writer", lambda f: (f.write(b"ab"), f.write(memoryview(b"cd"))))
        store.put("a/empty", b"")
        assert store.get("a/bytes") == b"hello"
        assert store.get("a/array") == np.arange(6, dtype="<u2").tobytes()
        assert store.get("a/writer") == b"abcd"
        assert store.get("a/empty") == b""
        assert store.size("a/array") == 12 and store.size("a/empty") == 0

    def test_a_large_streamed_object_arrives_whole(self, store):
        data = np.random.default_rng(1).integers(0, 256, 5_000_000, dtype=np.uint8)
        cuts = [0, 1, 700_000, 700_001, 3_000_000, 5_000_000]

        def writer(f):
            for a, b in zip(cuts[:-1], cuts[1:]):
                f.write(data[a:b])

        for size in (len(data), 10):  # a size given in advance, exact or wrong, changes nothing stored
            store.put("objects/sized", SizedWriter(size, writer))
            assert store.get("objects/sized") == data.tobytes()
        store.put("objects/large", writer)
        assert store.size("objects/large") == len(data)
        assert store.get("objects/large") == data.tobytes()

    def test_put_replaces_the_whole_object(self, store):
        store.put("k", b"a long first version")
        store.put("k", b"short")
        assert store.get("k") == b"short"

    def test_put_if_absent_creates_once(self, store):
        assert store.put_if_absent("versions/v1.json", b"first")
        assert not store.put_if_absent("versions/v1.json", b"second")
        assert store.get("versions/v1.json") == b"first"
        store.put("plain", b"x")
        assert not store.put_if_absent("plain", b"y")

    def test_racing_put_if_absent_has_exactly_one_winner(self, store):
        barrier = threading.Barrier(4)
        outcomes = {}

        def race(n):
            barrier.wait()
            outcomes[n] = store.put_if_absent("versions/v7.json", f"writer {n}".encode())

        threads = [threading.Thread(target=race, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [n for n, won in outcomes.items() if won]
        assert len(outcomes) == 4 and len(winners) == 1
        assert store.get("versions/v7.json") == f"writer {winners[0]}".encode()

    def test_exists_and_modified(self, store):
        before = time.time()
        store.put("x/y", b"1")
        assert store.exists("x/y") and not store.exists("x")
        assert before - 5 <= store.modified("x/y") <= time.time() + 5

    def test_list_gives_direct_children_sorted(self, store):
        for key in ("versions/v2.json", "versions/v10.json", "versions/v1.json", "versions/deep/x", "top"):
            store.put(key, b".")
        assert store.list("versions/") == ["versions/v1.json", "versions/v10.json", "versions/v2.json"]
        assert store.list("versions") == store.list("versions/")
        assert store.list("") == ["top"]
        assert store.list("nothing/") == []

    def test_delete_is_idempotent(self, store):
        store.put("d", b"1")
        store.delete("d")
        store.delete("d")
        assert not store.exists("d") and store.list("") == []

    def test_reader_reads_ranges_and_hashed_segments(self, store):
        data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8)
        store.put("objects/blob", data)
        offsets = np.array([5, 250_000, 100, 0, 299_990], U64)
        lengths = np.array([10, 1_000, 7, 3, 10], U64)
        dst = [np.zeros(2_000, np.uint8), np.zeros(100, np.uint8)]
        dst_index = np.array([0, 0, 1, 1, 1], U64)
        dst_offsets = np.array([0, 10, 0, 7, 10], U64)
        hashes = np.zeros(5, U64)
        with store.open_reader("objects/blob") as reader:
            assert reader.size() == 300_000
            assert reader.read(70_000, 5, "a field") == data[70_000:70_005].tobytes()
            target = bytearray(4)
            reader.read_into(299_996, memoryview(target), "the end")
            assert bytes(target) == data[-4:].tobytes()
            reader.read_segments(offsets, lengths, dst, dst_index, dst_offsets, hashes)
        for k, (o, n, d, at) in enumerate(zip(offsets, lengths, dst_index, dst_offsets)):
            piece = data[int(o) : int(o + n)]
            assert np.array_equal(dst[int(d)][int(at) : int(at + n)], piece)
            assert int(hashes[k]) == xxhash.xxh3_64_intdigest(piece.tobytes())
        assert store.get_range("objects/blob", 123, 4) == data[123:127].tobytes()

    def test_reading_past_the_end_is_an_integrity_error(self, store):
        store.put("short", b"0123456789")
        with store.open_reader("short") as reader:
            with pytest.raises(IntegrityError):
                reader.read(8, 5, "a tail")
            with pytest.raises(IntegrityError):
                reader.read_segments(np.array([4], U64), np.array([100_000], U64), [np.zeros(100_000, np.uint8)],
                                     np.zeros(1, U64), np.zeros(1, U64))
        with pytest.raises(IntegrityError):
            store.get_range("short", 8, 5)

    @pytest.mark.parametrize("key", ["", "/abs", "a/../b", ".hidden", "a//b", "a/.", "sp ace", "a\\b"])
    def test_malformed_keys_are_refused(self, store, key):
        with pytest.raises(MMPackError, match="invalid store key"):
            store.put(key, b"x")
        with pytest.raises(MMPackError, match="invalid store key"):
            store.get(key)

    def test_clean_temporaries_leaves_published_objects(self, store):
        store.put("objects/a", b"1")
        assert store.put_if_absent("versions/v1.json", b"2")
        report = store.clean_temporaries(0)
        assert isinstance(report, CleanupReport)
        assert store.get("objects/a") == b"1" and store.get("versions/v1.json") == b"2"
        assert store.list("objects/") == ["objects/a"]
