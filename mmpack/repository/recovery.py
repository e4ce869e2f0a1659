"""Recovering a version: bounded resolution across a chain of deltas, or the paper's recursion.

Bounded ("resolve"): from the manifests alone, find for every requested
(model, tensor) the newest version in the chain that wrote it, then read each
piece once, straight into the result, hashing it as it lands. The cost is one
pass over the bytes of the result, whatever the chain's length.

Recursive (the paper's Update recovery, kept as a reference): recover the
base set in full, then apply this version's delta; every level of the chain
re-reads and re-copies, so time grows like a staircase with each cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmpack import packing
from mmpack.approaches import APPROACHES, RebuildContext
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.fileformat import Header, Reader, RowRequest, Tail, check_padding, read_rows_many, verify_rows
from mmpack.modelset import ModelSet, normalize_indices
from mmpack.provenance import TrainingFunction
from mmpack.records import VersionRecord

if TYPE_CHECKING:
    from mmpack.repository.repo import Repository

U64 = np.uint64


# Objects one native read call holds open at once: a chain of any length is read in batches of
# this many, so a long history never runs into the process's limit on open files.
MAX_OPEN_OBJECTS = 256


def chain_of(repo: Repository, vid: str) -> list[VersionRecord]:
    """``vid`` and its bases, newest first, down to the first version that holds the full set.

    Every link is checked: a base must exist, be older (manifests guarantee
    it), and have the same number of models and the same architecture.
    """
    chain = [repo.version(vid)]
    while not chain[-1].is_full:
        record = chain[-1]
        try:
            base = repo.version(record.base)
        except VersionNotFoundError:
            raise RepositoryError(f"{record.describe()} is a delta on {record.base}, which is missing") from None
        if base.n_models != record.n_models or base.architecture != record.architecture:
            raise RepositoryError(
                f"{record.describe()} is a delta on {base.describe()} of another shape "
                f"(architecture {base.architecture}, not {record.architecture})"
            )
        chain.append(base)
    return chain


@contextlib.contextmanager
def open_object(repo: Repository, record: VersionRecord) -> Iterator[tuple[Reader, Header]]:
    """The version's data object, open, pinned and checked against the manifest (once per
    repository and version) before any size the manifest states is trusted."""
    ref = record.objects[0]
    with repo.objects.reader(ref) as opened:
        if (record.id, ref.key) not in repo.checked_objects:
            APPROACHES[record.approach].check_object(record, opened[1], repo.objects.tail(ref, opened))
            if not repo.store.remote:  # a few reads of at most 63 bytes; on object storage, requests
                check_padding(*opened)
            repo.checked_objects.add((record.id, ref.key))
        yield opened


def checked_tail(repo: Repository, record: VersionRecord) -> Tail:
    """The pinned tail (row index, hash table) of a version's data object, checked against its manifest."""
    with open_object(repo, record) as opened:
        return repo.objects.tail(record.objects[0], opened)


def owners(chain: list[VersionRecord], models: np.ndarray, n_tensors: int) -> np.ndarray:
    """For each (selected model, tensor): the index in ``chain`` of the newest version that wrote it.

    ``models`` must be sorted and unique. Only the selected models are looked
    up in each change list, so resolving one model costs little whatever the
    size of the set.
    """
    full = len(chain) - 1
    owner = np.full((len(models), n_tensors), full, dtype=np.int32)
    everyone = len(models) == chain[0].n_models  # sorted, unique and complete: row i is model i
    for position in range(full - 1, -1, -1):  # oldest delta first: newer ones overwrite
        changes = chain[position].changes
        if everyone:
            owner[changes.models] = np.where(changes.masks, position, owner[changes.models])
            continue
        at = np.searchsorted(changes.models, models)
        hit = at < len(changes.models)
        hit[hit] = changes.models[at[hit]] == models[hit]
        if hit.any():
            owner[hit] = np.where(changes.masks[at[hit]], position, owner[hit])
    return owner


def _group_by_owner(owner: np.ndarray, n_sources: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of the pairs each source owns, tensor by tensor with ascending rows (file
    order in every layout), found with one sort instead of a scan per source."""
    small = np.int16 if n_sources < 2**15 else np.int32  # numpy sorts 16-bit ints by radix, in linear time
    flat = owner.T.reshape(-1).astype(small)
    order = np.argsort(flat, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=n_sources))])
    height = owner.shape[0]
    pairs = []
    for p in range(n_sources):
        columns, rows = divmod(order[bounds[p] : bounds[p + 1]], height)
        pairs.append((rows, columns))
    return pairs


@dataclass(frozen=True)
class RebuildOptions:
    """How pieces that must be retrained are retrained (see ``Repository.recover``)."""

    executor: Executor | None = None
    training: Mapping[str, TrainingFunction] | None = None
    allow_import: bool = False


def _xor_base(record: VersionRecord, chain: list[VersionRecord]) -> str | None:
    """The version ``record``'s XOR deltas are taken against: always its chain's full version."""
    base = record.details.get("xor_base")
    if base is not None and base != chain[-1].id:
        raise RepositoryError(
            f"{record.describe()} stores XOR deltas against {base!r}, not its chain's full version {chain[-1].id}"
        )
    return base


def _file_order(rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, columns))
    return rows[order], columns[order]


def recover(
    repo: Repository,
    vid: str,
    indices: Iterable[int] | None,
    *,
    strategy: str = "resolve",
    verify: bool = True,
    options: RebuildOptions = RebuildOptions(),
) -> ModelSet:
    """The model set of version ``vid`` (or only ``indices``), bit-exact and verified."""
    if strategy == "recursive":
        full = _recover_recursive(repo, vid, verify, options)
        return full if indices is None else full.select(indices)
    if strategy != "resolve":
        raise ValueError(f"unknown recovery strategy {strategy!r}; use 'resolve' or 'recursive'")
    target = repo.version(vid)
    chain = chain_of(repo, vid)
    # The root's object states, in a header it is pinned to, how many models the chain holds: it
    # is checked against the manifests before anything is allocated from their sizes.
    if repo.store.remote:
        # A round trip per object: the root's header and tail travel with the architecture.
        with ThreadPoolExecutor(1) as background:
            opening = background.submit(checked_tail, repo, chain[-1])
            architecture = repo.architecture(target.architecture)
            opening.result()
    else:
        checked_tail(repo, chain[-1])
        architecture = repo.architecture(target.architecture)
    if indices is None:
        wanted = None
        models = np.arange(target.n_models)
    else:
        wanted = normalize_indices(indices, target.n_models)
        models, inverse = np.unique(wanted, return_inverse=True)
    tensors = {s.name: packing.empty_stacked(len(models), s) for s in architecture.tensors}
    destinations = [packing.byte_view(tensors[s.name]) for s in architecture.tensors]
    owner = repo.owner_map(vid, chain)
    owner = owner if len(models) == len(owner) else owner[models]
    computed = np.empty(owner.shape, dtype=U64)
    pieces = [(record, *pairs) for record, pairs in zip(chain, _group_by_owner(owner, len(chain)))]
    pieces = [[record, rows, columns] for record, rows, columns in pieces if len(rows)]
    context = RebuildContext(
        lambda base, wanted: recover(repo, base, wanted, verify=verify, options=options),
        repo.objects, options.training, options.allow_import, options.executor,
    )
    for record, rows, columns in pieces:
        if not APPROACHES[record.approach].stores_rows:
            computed[rows, columns] = _rebuild_pieces(context, record, models, rows, columns, architecture, tensors)
    copied = [piece for piece in pieces if APPROACHES[piece[0].approach].stores_rows]
    xor_pieces = [p for p in copied if _xor_base(p[0], chain) is not None]
    if xor_pieces:
        # XOR deltas apply to the full version's values of the same pairs: read those along
        # with the full version's own pairs (one decode of its chunks), then the deltas.
        if not copied or copied[-1][0] is not chain[-1]:
            copied.append([chain[-1], np.empty(0, np.int64), np.empty(0, np.int64)])
        root = copied[-1]
        root[1], root[2] = _file_order(np.concatenate([root[1], *(p[1] for p in xor_pieces)]),
                                       np.concatenate([root[2], *(p[2] for p in xor_pieces)]))
        copied = [p for p in copied if all(p is not q for q in xor_pieces)] + xor_pieces
    expected = None
    with ThreadPoolExecutor(1) as background:
        if repo.store.remote:  # a round trip per object header: have them travel together
            refs = [record.objects[0] for record, _, _ in copied]
            if APPROACHES[target.approach].stores_table(target):
                refs.append(target.objects[0])
            repo.objects.open_many(refs)
        if verify and repo.store.remote:  # the version's hashes travel while the rows do
            expected = background.submit(repo.hash_rows, vid, models)
        # Batches in order: an XOR result overwrites the hash of the reference row under it, and
        # XOR pieces come after the full version's rows they apply to.
        for first in range(0, len(copied), MAX_OPEN_OBJECTS):
            batch = copied[first : first + MAX_OPEN_OBJECTS]
            with contextlib.ExitStack() as stack:
                requests = []
                for record, rows, columns in batch:
                    opened = stack.enter_context(open_object(repo, record))
                    located = APPROACHES[record.approach].locate(repo.objects, record, opened, models[rows], columns)
                    xor = _xor_base(record, chain) is not None
                    requests.append(RowRequest(*opened, columns, located, rows, xor=xor))
                for (_, rows, columns), hashes in zip(batch, read_rows_many(requests, destinations)):
                    computed[rows, columns] = hashes
        if verify:
            expected = expected.result() if expected is not None else repo.hash_rows(vid, models)
    if expected is not None:
        rows, columns = np.indices(owner.shape).reshape(2, -1)
        verify_rows(models[rows], columns, computed.reshape(-1), expected.reshape(-1), f"version {vid}")
    result = ModelSet._trusted(architecture, tensors, len(models))
    if wanted is None or np.array_equal(models, wanted):
        return result
    return result.select(inverse)


def _rebuild_pieces(
    context: RebuildContext,
    record: VersionRecord,
    models: np.ndarray,
    rows: np.ndarray,
    columns: np.ndarray,
    architecture,
    tensors: dict[str, torch.Tensor],
) -> np.ndarray:
    """Retrain the models owning pieces ``(rows, columns)`` and put those pieces in place; their hashes."""
    needed = np.unique(rows)
    state = APPROACHES[record.approach].rebuild(context, record, models[needed])
    position = np.searchsorted(needed, rows)
    for j in np.unique(columns):
        name = architecture.tensors[j].name
        pick = columns == j
        tensors[name][torch.from_numpy(rows[pick])] = state.tensors[name][torch.from_numpy(position[pick])]
    return state.hashes()[position, columns]


def _recover_recursive(repo: Repository, vid: str, verify: bool, options: RebuildOptions) -> ModelSet:
    """The paper's recovery: the full version, then every delta of the chain applied in turn (a loop,
    not a recursion: chains may be thousands of versions long)."""
    chain = chain_of(repo, vid)
    root = chain[-1]
    architecture = repo.architecture(root.architecture)
    checked_tail(repo, root)  # sizes checked before the allocation
    result = ModelSet._trusted(
        architecture,
        {s.name: packing.empty_stacked(root.n_models, s) for s in architecture.tensors},
        root.n_models,
    )
    for record in reversed(chain):
        if record is root:
            written = np.ones((record.n_models, len(architecture)), dtype=bool)
        else:
            written = record.changes.dense(record.n_models)
        columns, rows = np.nonzero(written.T)  # file order: tensor by tensor
        approach = APPROACHES[record.approach]
        if approach.stores_rows:
            destinations = [packing.byte_view(result.tensors[s.name]) for s in architecture.tensors]
            xor = record is not root and _xor_base(record, chain) is not None
            with contextlib.ExitStack() as stack:
                requests = []
                if xor:  # the deltas apply to the full version's values, not the base's
                    opened_root = stack.enter_context(open_object(repo, root))
                    located = APPROACHES[root.approach].locate(repo.objects, root, opened_root, rows, columns)
                    requests.append(RowRequest(*opened_root, columns, located, rows))
                opened = stack.enter_context(open_object(repo, record))
                stored = approach.locate(repo.objects, record, opened, rows, columns)
                requests.append(RowRequest(*opened, columns, stored, rows, xor=xor))
                computed = read_rows_many(requests, destinations)[-1]
        else:
            base = result  # the whole base set is at hand: retrain from it, as the paper does
            context = RebuildContext(
                lambda _, wanted, base=base: base.select(wanted), repo.objects, options.training,
                options.allow_import, options.executor,
            )
            result = ModelSet._trusted(architecture, {n: t.clone() for n, t in base.tensors.items()}, record.n_models)
            computed = _rebuild_pieces(context, record, np.arange(record.n_models), rows, columns, architecture,
                                       dict(result.tensors))
        if verify:
            expected = repo.hashes(record.id)[rows, columns]
            verify_rows(rows, columns, computed, expected, f"version {record.id}")
    return result
