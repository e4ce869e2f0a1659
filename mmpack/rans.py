"""The codec of format version 3: element fields, rANS-coded with tables each tensor shares.

Specified in docs/FORMAT.md ("Compressed objects, version 3"). Every element
is cut into fields by bit position (for floats: the 12 bits below the sign,
that is the exponent with the top mantissa bits, then the sign with the next
three bits, then the low bytes); each field of a tensor is stored raw, as one
constant, or rANS-coded with one frequency table for all the tensor's chunks,
whichever the encoder estimates smallest. A tensor's section is its *table
block*, then its chunks; a chunk decodes on its own, so a partial read
decodes only the chunks holding the wanted rows, with the table read beside
them. The kernels (``csrc/fields.cpp``, ``csrc/rans.cpp``) encode and decode
many chunks per call on the kernels' threads, with the GIL released.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmpack import _io, _native
from mmpack.compression import check_compression_object
from mmpack.errors import FormatError, IntegrityError

CODEC = "rans"
TRANSFORM = "fields"
FLOATING, INTEGER, HALF = 0, 1, 2  # the layout families of docs/FORMAT.md
_FLOATING_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.complex64, torch.complex128)
# A chunk's table block holds at most this many bytes per field: a mode, a count and 256 symbols.
_MAX_TABLE_BYTES_PER_FIELD = 1 + 2 + 4 * 256
JOB_COLUMNS = 10


@functools.cache
def layout_code(dtype: torch.dtype) -> int:
    """The element layout of ``dtype`` for the kernels: width in bytes | family << 8.

    Complex values are pairs of floats (their components are the elements);
    float16 has its own layout (its exponent has 5 bits); every other dtype is
    coded as integers of its width.
    """
    size = torch.empty((), dtype=dtype).element_size()
    if dtype.is_complex:
        return size // 2 | FLOATING << 8
    if dtype == torch.float16:
        return 2 | HALF << 8
    if dtype in _FLOATING_DTYPES:
        return size | FLOATING << 8
    return size | INTEGER << 8


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one coded element of ``dtype`` (a complex value's component)."""
    return layout_code(dtype) & 0xFF


@dataclass(frozen=True)
class Encoded:
    """One tensor's encoded section: ``data`` is the table block then the chunks, back to back."""

    data: np.ndarray
    table_length: int
    chunk_lengths: tuple[int, ...]


def encode_rows(data: np.ndarray, n_rows: int, row_bytes: int, dtype: torch.dtype, chunk_rows: int) -> Encoded:
    """Encode ``n_rows`` contiguous rows (``data``, uint8) of a ``dtype`` tensor in chunks of
    ``chunk_rows`` rows, with one table block for all of them."""
    section = _native.rans_encode(data, n_rows, row_bytes, chunk_rows, layout_code(dtype))
    return Encoded(np.frombuffer(section, np.uint8), section.table_length, tuple(section.chunk_lengths))


def section_jobs(sections: Sequence[Encoded], chunk_bytes: Sequence[int], totals: Sequence[int]) -> np.ndarray:
    """Decode jobs (see :func:`decode`) for every chunk of every section, no hashes: section k's
    chunks are in payload k and decode with table k, each whole into its place in destination k
    (``totals[k]`` bytes, chunks of ``chunk_bytes[k]``)."""
    counts = np.array([len(e.chunk_lengths) for e in sections], np.int64)
    lengths = np.fromiter(itertools.chain.from_iterable(e.chunk_lengths for e in sections), np.int64,
                          int(counts.sum()))
    section = np.repeat(np.arange(len(sections), dtype=np.int64), counts)
    ends = np.cumsum(lengths)
    first = np.cumsum(counts) - counts
    before = np.concatenate([[0], ends])[first]  # bytes of chunks in earlier sections
    tables = np.array([e.table_length for e in sections], np.int64)
    chunk = np.asarray(chunk_bytes, np.int64)[section]
    at = (np.arange(len(lengths)) - first[section]) * chunk
    jobs = np.zeros((len(lengths), JOB_COLUMNS), np.uint64)
    jobs[:, 0] = jobs[:, 1] = jobs[:, 4] = section
    jobs[:, 2] = tables[section] + ends - lengths - before[section]
    jobs[:, 3] = lengths
    jobs[:, 5] = at
    jobs[:, 6] = jobs[:, 9] = np.minimum(chunk, np.asarray(totals, np.int64)[section] - at)
    return jobs


@dataclass(frozen=True)
class RansChunking:
    """The ``compression`` object of a version 3 header, validated against the layout it describes.

    ``tables[j]`` is the length of tensor j's table block, ``lengths[j]`` the
    stored length of each of its chunks; the section is the table block, then
    the chunks in order.
    """

    delta: str
    chunk_rows: tuple[int, ...]
    tables: tuple[int, ...]
    lengths: tuple[tuple[int, ...], ...]
    layouts: tuple[int, ...]
    # Start of every chunk within its tensor's section, plus the section's end.
    starts: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)
    # The same, all tensors in one array: tensor j's chunk c starts at flat_starts[flat_base[j] + c].
    flat_starts: np.ndarray = field(init=False, repr=False, compare=False)
    flat_base: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = []
        for table, lengths in zip(self.tables, self.lengths):
            offsets = np.cumsum(np.asarray([table, *lengths], dtype=np.int64))
            starts.append(offsets)
        object.__setattr__(self, "starts", tuple(starts))
        sizes = np.array([len(x) for x in starts], np.int64)
        object.__setattr__(self, "flat_starts", np.concatenate(starts) if starts else np.zeros(0, np.int64))
        object.__setattr__(self, "flat_base", np.cumsum(sizes) - sizes)

    def section_length(self, j: int) -> int:
        return int(self.starts[j][-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": CODEC,
            "transform": TRANSFORM,
            "delta": self.delta,
            "chunk_rows": list(self.chunk_rows),
            "tables": list(self.tables),
            "chunks": [list(x) for x in self.lengths],
        }

    @classmethod
    def from_json(
        cls, data: object, dtypes: Sequence[torch.dtype], row_bytes: Sequence[int], rows: Sequence[int]
    ) -> RansChunking:
        """Parse and check a version 3 header's ``compression`` object; ``rows[j]`` is tensor j's stored row count."""
        n = len(dtypes)
        chunk_rows, chunks = check_compression_object(data, {"tables"}, CODEC, TRANSFORM, n, "stored chunk lengths")
        tables = data["tables"]
        if not (isinstance(tables, list) and len(tables) == n and all(_is_int(t, 0) for t in tables)):
            raise FormatError(f"tables must list the table block length of each of the {n} tensors")
        layouts = tuple(layout_code(d) for d in dtypes)
        for j in range(n):
            n_chunks = -(-rows[j] // chunk_rows[j])
            # Counted before anything is built: a forged header cannot make the reader allocate.
            if len(chunks[j]) != n_chunks:
                raise FormatError(f"tensor #{j} has {len(chunks[j])} chunks, its rows make {n_chunks}")
            if not all(_is_int(length, 0) for length in chunks[j]):
                raise FormatError(f"tensor #{j}: chunk lengths must be integers from 0")
            fields = layouts[j] & 0xFF
            if rows[j] * row_bytes[j] == 0:
                if tables[j] != 0 or any(chunks[j]):
                    raise FormatError(f"tensor #{j} stores no elements, so its table block and chunks must be empty")
            elif not fields <= tables[j] <= fields * _MAX_TABLE_BYTES_PER_FIELD:
                raise FormatError(f"tensor #{j}: a table block of {tables[j]} bytes cannot describe {fields} fields")
        return cls(data["delta"], tuple(chunk_rows), tuple(tables), tuple(tuple(c) for c in chunks), layouts)


def _is_int(value: object, minimum: int) -> bool:
    return type(value) is int and minimum <= value < 2**62


def decode(
    tables: Sequence[Any], layouts: Sequence[int], payloads: Sequence[Any], jobs: np.ndarray,
    destinations: Sequence[np.ndarray], hashes: np.ndarray | None,
) -> None:
    """Run decode jobs (``JOB_COLUMNS`` numbers each, see ``_native.rans_decode``: a job whose out
    length is below its chunk bytes decodes only that prefix of the chunk) on the kernels'
    threads; a corrupt table block or chunk raises :class:`IntegrityError`."""
    try:
        _native.rans_decode(list(tables), np.asarray(layouts, np.uint64), list(payloads),
                            np.ascontiguousarray(jobs, np.uint64).reshape(-1), list(destinations), hashes)
    except _native.DecodeError as exc:
        raise IntegrityError(f"a compressed chunk does not decode ({exc.args[0]}): the data is corrupt") from None


def decode_files(
    tables: Sequence[Any], layouts: Sequence[int], fds: Sequence[int], jobs: np.ndarray,
    destinations: Sequence[np.ndarray], hashes: np.ndarray | None, names: Sequence[str] = (),
) -> None:
    """:func:`decode` with the chunks still in open files: a job's payload index names
    ``fds[index]`` and its offset is a file position. Each kernel thread reads the chunks it
    decodes, so a full read needs no staging buffer and decodes chunks while they are in cache. A
    file that ends early is an :class:`IntegrityError` naming it (``names[i]`` for ``fds[i]``)."""
    try:
        _native.rans_decode_files(list(tables), np.asarray(layouts, np.uint64), list(fds),
                                  np.ascontiguousarray(jobs, np.uint64).reshape(-1), list(destinations), hashes)
    except _native.DecodeError as exc:
        raise IntegrityError(f"a compressed chunk does not decode ({exc.args[0]}): the data is corrupt") from None
    except _native.ShortReadError as exc:
        raise _io.truncated(exc, names) from None
