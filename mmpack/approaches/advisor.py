"""The approach advisor: estimates of what each approach would cost, and policies that pick one.

``repo.save(..., approach="auto")`` asks every registered approach for an
:class:`Estimate` of the version it would store (bytes added to the store,
seconds to recover the whole version), through :meth:`Approach.estimate`;
an approach that cannot store the version (Update without a base, Provenance
without provenance) answers None. A :class:`Policy` then picks one.

The estimates come from a small cost model, :class:`CostModel`, built once per
save: the chain below the new version (read from manifests), the raw bytes of
the set, the compressibility of this set's data measured on a sample, and
:class:`Throughputs` measured once per process (copying verified rows,
decoding compressed chunks, the fixed cost of each object a recovery opens).
Recovering a version costs, in this model::

    objects * per_object_seconds + raw_bytes / read_bytes_per_s + decoded_bytes / decode_bytes_per_s

which is what mmpack's bounded recovery does: it opens every object of the
chain, copies every row of the result once, and decodes every chunk that
holds a wanted row (for a full recovery, every chunk of every compressed
object in the chain).
"""

from __future__ import annotations

import functools
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpack import _native, compression, packing, rans
from mmpack.errors import MMPackError

if TYPE_CHECKING:
    from mmpack.approaches.request import SaveRequest
    from mmpack.records import VersionRecord

_SAMPLE_BYTES = 2 << 20
_CALIBRATION_BYTES = 8 << 20


@dataclass(frozen=True)
class Throughputs:
    """Throughputs(read_bytes_per_s, decode_bytes_per_s, per_object_seconds)

    The speeds the cost model turns bytes into seconds with: copying and
    verifying rows that are already stored raw, decoding compressed chunks
    (raw bytes out per second), and the fixed cost of one object a recovery
    touches (opening it, its header, its manifest). :func:`measured_throughputs`
    measures them on this machine; tests and callers with better knowledge
    (a slow object store) pass their own to :class:`mmpack.Repository`.

    Example::

        repo = mmpack.Repository("cells.repo", throughputs=Throughputs(2e9, 5e8, 0.002))
    """

    read_bytes_per_s: float
    decode_bytes_per_s: float
    per_object_seconds: float

    def __post_init__(self) -> None:
        if not (self.read_bytes_per_s > 0 and self.decode_bytes_per_s > 0 and self.per_object_seconds >= 0):
            raise MMPackError(f"throughputs must be positive, got {self}")


@functools.lru_cache(maxsize=1)
def measured_throughputs() -> Throughputs:
    """measured_throughputs() -> Throughputs, measured once per process (about 50 ms).

    Reads: one native copy-and-hash of 8 MiB of 9 KiB rows into fresh memory,
    as recovery does. Decoding: 2 MiB of float32 values with a trained-weight
    like spread, encoded and decoded by the same code as objects. Per object:
    parsing and checking one object header. The best of three runs each, so a
    busy moment does not stick for the life of the process.

    Example::

        print(measured_throughputs().read_bytes_per_s / 1e9, "GB/s")
    """
    import torch

    from mmpack._io import FileReader
    from mmpack.architecture import Architecture, TensorSpec
    from mmpack.fileformat import encode_header
    from mmpack.fileformat import header as header_module

    rng = np.random.default_rng(0)
    row = 9216
    source = rng.integers(0, 256, _CALIBRATION_BYTES, dtype=np.uint8)
    n = _CALIBRATION_BYTES // row
    offsets = np.arange(n, dtype=np.uint64) * np.uint64(row)
    zeros = np.zeros(n, np.uint64)
    lengths = np.full(n, row, np.uint64)

    def copy() -> None:
        destination = np.empty(n * row, np.uint8)  # fresh memory: recovery pays its first touch too
        _native.copy_segments([source], zeros, offsets, [destination], zeros, offsets, lengths, np.empty(n, np.uint64))

    read = n * row / _best_of(copy)
    values = (rng.standard_normal(_SAMPLE_BYTES // 4) * 0.1).astype("<f4").view(np.uint8)
    # The default codec's decoding (rans); zstd objects decode about half as fast.
    rows_per_chunk = compression.rows_per_chunk(4, compression.DEFAULT_CHUNK_BYTES)
    encoded = rans.encode_rows(values, len(values) // 4, 4, torch.float32, rows_per_chunk)
    layout = rans.layout_code(torch.float32)
    decode = len(values) / _best_of(lambda: _decode_all(encoded, layout, rows_per_chunk * 4, len(values)))
    architecture = Architecture(
        tuple(TensorSpec(f"fc{k}.weight", "parameter", torch.float32, (48, 48)) for k in range(7)), None
    )
    body = encode_header(architecture, 5000, {})[0][header_module.PREAMBLE.size :]

    def open_one() -> None:
        # What a recovery pays per object: open a file, read its preamble and size, then parse
        # and check a header (bypassing the parse cache, which would make it free).
        with open(__file__, "rb", buffering=0) as f, FileReader(f) as reader:
            reader.read(0, header_module.PREAMBLE.size, "the preamble")
            reader.size()
            header_module._parse_header.__wrapped__(body.rstrip(b"\0"), 1)

    per_object = _best_of(open_one)
    return Throughputs(read, decode, per_object)


def _decode_all(encoded: rans.Encoded, layout: int, chunk_raw: int, total: int) -> None:
    out = np.empty(total, np.uint8)
    table = encoded.data[: encoded.table_length]
    rans.decode([table], [layout], [encoded.data], rans.section_jobs([encoded], [chunk_raw], [total]), [out], None)


def _best_of(action, runs: int = 3) -> float:
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


@dataclass(frozen=True)
class Estimate:
    """Estimate(stored_bytes, recover_seconds)

    What storing one version one way would cost: bytes it adds to the store,
    and the expected seconds to recover the whole version afterwards.

    Example::

        Estimate(stored_bytes=1_300_000, recover_seconds=0.4)
    """

    stored_bytes: int
    recover_seconds: float

    def to_json(self) -> dict[str, Any]:
        """The estimate as a version's ``details["estimates"]`` keep it."""
        return {"stored_bytes": int(self.stored_bytes), "recover_seconds": round(float(self.recover_seconds), 6)}


class CostModel:
    """What every approach's estimate for one save shares.

    ``chain``: the base version and its bases down to the full version,
    newest first (empty without a base). ``full_raw_bytes``: one full set's
    parameter bytes. ``compression_ratio``: stored over raw bytes of this
    set's data under the save's compression, measured on a sample of about
    2 MiB (1.0 uncompressed); a delta is assumed to compress like the full
    data, which overestimates XOR deltas.
    """

    def __init__(self, request: SaveRequest, chain: list[VersionRecord], throughputs: Throughputs) -> None:
        self.request = request
        self.chain = chain
        self.throughputs = throughputs
        self.full_raw_bytes = request.models.nbytes
        self.table_bytes = len(request.models) * len(request.models.architecture) * 8

    @cached_property
    def compression_ratio(self) -> float:
        setting = self.request.compression
        if setting is None or self.full_raw_bytes == 0:
            return 1.0
        ms = self.request.models
        take = max(1, min(len(ms), _SAMPLE_BYTES // max(ms.architecture.nbytes_per_model, 1)))
        raw = stored = 0
        for spec in ms.architecture.tensors:
            data = packing.byte_view(ms.tensors[spec.name])[: take * spec.nbytes]
            chunk_rows = compression.rows_per_chunk(spec.nbytes, setting.chunk_bytes)
            if setting.codec == compression.CODEC:
                _, lengths = compression.encode_rows(
                    data, take, spec.nbytes, compression.element_width(spec.dtype), chunk_rows, setting.zstd_level
                )
                stored += sum(lengths)
            else:
                stored += len(rans.encode_rows(data, take, spec.nbytes, spec.dtype, chunk_rows).data)
            raw += len(data)
        return stored / raw if raw else 1.0

    def stored_bytes(self, raw_bytes: int) -> int:
        """Bytes ``raw_bytes`` of this set's rows take once stored."""
        return int(math.ceil(raw_bytes * self.compression_ratio))

    def recover_seconds(self, objects: int, decoded_bytes: int) -> float:
        """Seconds to recover the whole set from ``objects`` objects, decoding ``decoded_bytes`` raw bytes."""
        t = self.throughputs
        return (
            objects * t.per_object_seconds
            + self.full_raw_bytes / t.read_bytes_per_s
            + decoded_bytes / t.decode_bytes_per_s
        )

    def chain_decoded_bytes(self) -> int:
        """Raw bytes a full recovery decodes from the existing chain's compressed objects."""
        return sum(raw_bytes_of(record, self.full_raw_bytes, self.row_bytes) for record in self.chain
                   if record.details.get("compression") is not None)

    @cached_property
    def row_bytes(self) -> np.ndarray:
        return np.array([s.nbytes for s in self.request.models.architecture.tensors], dtype=np.int64)


def raw_bytes_of(record: VersionRecord, full_raw_bytes: int, row_bytes: np.ndarray) -> int:
    """Raw tensor bytes a version's own objects hold (its changed rows, or a full set)."""
    if record.is_full:
        return full_raw_bytes
    return int(record.changes.masks.sum(axis=0) @ row_bytes)


class Policy(ABC):
    """How ``approach="auto"`` picks among the approaches' estimates.

    Subclass it and implement :meth:`choose` (and :meth:`describe`) for a
    policy of your own.

    Example::

        repo.save(models, approach="auto", base=v1, policy=mmpack.FastestRecovery())
    """

    @abstractmethod
    def choose(self, estimates: dict[str, Estimate]) -> tuple[str, str]:
        """The chosen approach's name and why, from the estimates of those available."""

    @abstractmethod
    def describe(self) -> str:
        """A few words for version records."""


@dataclass(frozen=True)
class SmallestUnder(Policy):
    """SmallestUnder(seconds)

    The approach that stores the fewest bytes among those expected to
    recover the version within ``seconds``; if none is, the fastest to
    recover. ``SmallestUnder(math.inf)`` is "smallest storage" (the paper's
    priority, and the repository's default).

    Example::

        repo.save(models, approach="auto", base=v1, policy=SmallestUnder(seconds=0.5))
    """

    seconds: float

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, (int, float)) and self.seconds > 0):
            raise MMPackError(f"SmallestUnder needs a positive number of seconds, got {self.seconds!r}")

    def choose(self, estimates: dict[str, Estimate]) -> tuple[str, str]:
        fits = {n: e for n, e in estimates.items() if e.recover_seconds <= self.seconds}
        if not fits:
            name = min(estimates, key=lambda n: (estimates[n].recover_seconds, estimates[n].stored_bytes))
            return name, f"no approach recovers within {self.seconds:g} s; {name} is the fastest"
        name = min(fits, key=lambda n: (fits[n].stored_bytes, fits[n].recover_seconds))
        return name, f"{name} stores the least" + (f" of those recovering within {self.seconds:g} s"
                                                   if math.isfinite(self.seconds) else "")

    def describe(self) -> str:
        return (
            "smallest storage" if math.isinf(self.seconds) else f"smallest storage recovering within {self.seconds:g} s"
        )


@dataclass(frozen=True)
class FastestRecovery(Policy):
    """FastestRecovery()

    The approach expected to recover the version fastest; the smaller one on a tie.

    Example::

        repo.save(models, approach="auto", base=v1, policy=FastestRecovery())
    """

    def choose(self, estimates: dict[str, Estimate]) -> tuple[str, str]:
        name = min(estimates, key=lambda n: (estimates[n].recover_seconds, estimates[n].stored_bytes))
        return name, f"{name} recovers fastest"

    def describe(self) -> str:
        return "fastest recovery"


def check_policy(policy: object) -> Policy:
    if not isinstance(policy, Policy):
        raise MMPackError(f"policy must be an mmpack.Policy such as SmallestUnder(seconds=1.0), got {policy!r}")
    return policy
