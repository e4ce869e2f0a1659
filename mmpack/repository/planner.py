"""Recovery plans: which pieces of which objects a recovery needs, as a plain value.

A plan is made from the catalog alone (records, change lists), before any
object is opened: for every requested (model, tensor), the newest version of
the chain that wrote it, and there the row that holds it. Bounded recovery
reads each piece once, whatever the length of the chain. A plan can be
printed, compared and tested without touching storage; the executor
(:mod:`mmpack.repository.executor`) carries it out.

Example::

    plan = plan_recovery(tables, "v7", [3, 17])
    print(plan)        # RecoveryPlan(v7, 2 models: 14 pieces from v7 (7), v1 (7))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mmpack.approaches import APPROACHES
from mmpack.errors import RepositoryError
from mmpack.modelset import normalize_indices
from mmpack.records import VersionRecord
from mmpack.repository.catalog.tables import Tables


@dataclass(frozen=True, eq=False)
class Read:
    """Rows of one data object (shard) of a version to put in place.

    ``object`` is the shard's index in the version's ``objects``. Row ``k``
    is tensor ``tensors[k]`` of model ``models[k]``, stored at row
    ``stored_rows[k]`` of that tensor's section, and lands on row
    ``dst_rows[k]`` of the result. ``xor``: the object holds XOR deltas,
    applied onto the reference rows an earlier read put there.
    """

    version: str
    models: np.ndarray
    tensors: np.ndarray
    stored_rows: np.ndarray
    dst_rows: np.ndarray
    xor: bool = False
    object: int = 0

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True, eq=False)
class Rebuild:
    """Pieces a version rebuilds (retrains): rows ``rows`` (positions in the plan's models) of
    tensors ``columns``."""

    version: str
    rows: np.ndarray
    columns: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, eq=False)
class RecoveryPlan:
    """What recovering ``version`` (its models ``models``, sorted and unique) takes.

    ``root`` is the chain's full version, whose object fixes the set's size
    before anything is allocated. ``reads`` run in order (XOR reads after the
    reads of their references); ``rebuilds`` before them. ``order``, when not
    None, picks the caller's order (duplicates included) out of ``models``.
    """

    version: str
    root: str
    models: np.ndarray
    n_tensors: int
    reads: tuple[Read, ...]
    rebuilds: tuple[Rebuild, ...]
    order: np.ndarray | None = field(default=None)
    #: The tensors (architecture indices, ascending) the plan recovers; None: all.
    tensors: np.ndarray | None = field(default=None)

    @property
    def pieces(self) -> int:
        """How many pieces the plan reads or rebuilds, in all."""
        return sum(map(len, self.reads)) + sum(map(len, self.rebuilds))

    def __repr__(self) -> str:
        reads = Counter(r.version for r in self.reads)  # a version read from several shards names each
        parts = [f"{r.version}{f'#{r.object}' if reads[r.version] > 1 else ''}{' xor' if r.xor else ''} ({len(r)})"
                 for r in self.reads]
        parts += [f"{r.version} rebuilt ({len(r)})" for r in self.rebuilds]
        return f"RecoveryPlan({self.version}, {len(self.models)} models: {self.pieces} pieces from {', '.join(parts)})"


def plan_recovery(tables: Tables, vid: str, indices: Iterable[int] | None = None,
                  tensors: Iterable[int] | None = None) -> RecoveryPlan:
    """The plan that recovers version ``vid`` (or only ``indices``; only the tensors ``tensors``,
    architecture indices) with bounded resolution."""
    chain = tables.chain(vid)
    target, root = chain[0], chain[-1]
    n_tensors = len(tables.catalog.architecture(target.architecture))
    order = None
    if indices is None:
        models = np.arange(target.n_models)
    else:
        wanted = normalize_indices(indices, target.n_models)
        if len(wanted) > 1 and not (wanted[1:] > wanted[:-1]).all():  # not already sorted and unique
            models, order = np.unique(wanted, return_inverse=True)
        else:
            models = wanted
    owner = tables.owners(chain, models, n_tensors)
    columns_of = None
    if tensors is not None:
        columns_of = np.unique(np.asarray(list(tensors), np.int64))
        if len(columns_of) and (columns_of[0] < 0 or columns_of[-1] >= n_tensors):
            raise RepositoryError(f"tensor #{int(columns_of[-1])} is not one of the {n_tensors} tensors")
        owner = owner[:, columns_of]
    groups = group_by_owner(owner, len(chain))
    if columns_of is not None:
        groups = [(rows, columns_of[columns]) for rows, columns in groups]
    pieces = [(record, rows, columns) for record, (rows, columns) in zip(chain, groups) if len(rows)]
    rebuilds = tuple(
        Rebuild(r.id, rows, columns) for r, rows, columns in pieces if not APPROACHES[r.approach].stores_rows
    )
    copied = [[r, rows, columns] for r, rows, columns in pieces if APPROACHES[r.approach].stores_rows]
    xor_pieces = [p for p in copied if xor_base(p[0], chain) is not None]
    if xor_pieces:
        # XOR deltas apply to the full version's values of the same pairs: read those along
        # with the full version's own pairs (one decode of its chunks), then the deltas.
        if not copied or copied[-1][0] is not root:
            copied.append([root, np.empty(0, np.int64), np.empty(0, np.int64)])
        own = copied[-1]
        own[1], own[2] = file_order(np.concatenate([own[1], *(p[1] for p in xor_pieces)]),
                                    np.concatenate([own[2], *(p[2] for p in xor_pieces)]))
        copied = [p for p in copied if all(p is not q for q in xor_pieces)] + xor_pieces
    reads = []
    for record, rows, columns in copied:
        xor = xor_base(record, chain) is not None
        reads.extend(reads_of(record, models[rows], columns, rows, xor))
    return RecoveryPlan(vid, root.id, models, n_tensors, tuple(reads), rebuilds, order, columns_of)


def reads_of(record: VersionRecord, models: np.ndarray, tensors: np.ndarray, dst_rows: np.ndarray,
             xor: bool = False) -> list[Read]:
    """The reads that fetch pairs (``models[k]``, ``tensors[k]``) the version owns, one per shard that
    holds some, each in the order given (file order, when given tensor by tensor)."""
    objects, located = APPROACHES[record.approach].locate(record, models, tensors)
    if not len(objects):
        return []
    if objects.min() == objects.max():
        return [Read(record.id, models, tensors, located, dst_rows, xor, int(objects[0]))]
    order = np.argsort(objects, kind="stable")
    bounds = np.flatnonzero(np.diff(objects[order])) + 1
    return [Read(record.id, models[k], tensors[k], located[k], dst_rows[k], xor, int(objects[k[0]]))
            for k in np.split(order, bounds)]


def group_by_owner(owner: np.ndarray, n_sources: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of the pairs each source owns, tensor by tensor with ascending rows (file
    order in every layout), found with one sort instead of a scan per source."""
    height = owner.shape[0]
    if n_sources == 1:  # a full version on its own (no deltas): it owns every pair
        columns, rows = divmod(np.arange(owner.size), height)
        return [(rows, columns)]
    small = np.int16 if n_sources < 2**15 else np.int32  # numpy sorts 16-bit ints by radix, in linear time
    flat = owner.T.reshape(-1).astype(small)
    order = np.argsort(flat, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n_sources))])
    pairs = []
    for p in range(n_sources):
        columns, rows = divmod(order[bounds[p] : bounds[p + 1]], height)
        pairs.append((rows, columns))
    return pairs


def xor_base(record: VersionRecord, chain: list[VersionRecord]) -> str | None:
    """The version ``record``'s XOR deltas are taken against: always its chain's full version."""
    base = record.details.get("xor_base")
    if base is not None and base != chain[-1].id:
        raise RepositoryError(
            f"{record.describe()} stores XOR deltas against {base!r}, not its chain's full version {chain[-1].id}"
        )
    return base


def file_order(rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, columns))
    return rows[order], columns[order]
