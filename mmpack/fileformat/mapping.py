"""``mmpack.load(path, mmap=True)``: a model set whose tensors are memory maps of the file.

The torch.load convention: nothing of the tensors is read at load, pages come
from the file as they are touched. What is checked when:

* at load: the preamble, the header (checksum, layout), the file's size, the
  padding and the hash table (read into memory): an object that is not
  well-formed is refused before anything is mapped;
* the tensor bytes: by :meth:`MappedModelSet.verify` (one pass over the
  file, every row against the table), and for the models taken out with
  :meth:`MappedModelSet.select` (copied and hashed in one pass). Tensors used
  in place (``ms.tensors``, ``vmap_call``) are the file's bytes as they are:
  call ``verify()`` before trusting a file you did not write.

The mapping is private (copy on write): writing to a tensor changes this
process's copy, never the file.

**Caveat: SIGBUS.** A process that touches a mapped page after another
process truncated the file gets SIGBUS and dies; no Python code can catch
it. mmpack never truncates or rewrites a published file (it writes under a
new name and renames), but other tools may. That is why every other read
path of mmpack uses positioned reads (docs/DESIGN-NOTES.md, "Reading without
a memory map"): use ``mmap=True`` only for files nothing else modifies, or
``Repository.recover_lazy`` for lazy access without that risk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

import numpy as np
import torch

from mmpack import _io, _native, packing
from mmpack.errors import FormatError, IntegrityError, InvalidArgumentError
from mmpack.fileformat.header import STACKED, read_header
from mmpack.fileformat.reading import _verify_columns, check_padding, check_size, read_hash_table, verify_rows
from mmpack.modelset import ModelSet, normalize_indices

U64 = np.uint64


class MappedModelSet(ModelSet):
    """A :class:`ModelSet` whose tensors map a file (``mmpack.load(path, mmap=True)``; module docstring).

    Example::

        ms = mmpack.load("fleet.mmpack", mmap=True)   # reads the header and the hash table
        ms.verify()                                   # every row against its hash
        cells = ms.select([3, 17])                    # copied out, verified
    """

    __slots__ = ("_stored", "_where")

    @property
    def stored_hashes(self) -> np.ndarray:
        """The file's hash table ``[n_models, n_tensors]``: what every row must hash to."""
        return self._stored

    def verify(self) -> None:
        """Hash every (model, tensor) of the mapped bytes and compare with the file's table; check
        that ``bool`` rows hold only 0 and 1. :class:`~mmpack.IntegrityError` names the first bad one.

        Example::

            mmpack.load("fleet.mmpack", mmap=True).verify()
        """
        width = len(self._architecture)
        computed = self.hashes().T.reshape(width, self._n_models)
        _verify_columns(np.arange(self._n_models), computed, self._stored, self._where)
        for spec in self._architecture.tensors:
            _check_bool(spec, packing.byte_view(self._tensors[spec.name]), self._where)

    def select(self, indices: Iterable[int]) -> ModelSet:
        """ms.select(indices) -> ModelSet: copies of those models, each row hashed as it is copied
        and checked against the file's table.

        Example::

            ms.select(range(100))
        """
        wanted = normalize_indices(indices, self._n_models)
        specs = self._architecture.tensors
        out = {s.name: packing.empty_stacked(len(wanted), s) for s in specs}
        sizes = np.array([s.nbytes for s in specs], U64)
        width = len(specs)
        tensor = np.repeat(np.arange(width, dtype=U64), len(wanted))
        rows = np.tile(wanted.astype(U64), width)
        into = np.tile(np.arange(len(wanted), dtype=U64), width)
        hashes = np.empty(len(tensor), U64)
        _native.copy_segments(
            [packing.byte_view(self._tensors[s.name]) for s in specs], tensor, rows * sizes[tensor.astype(np.intp)],
            [packing.byte_view(out[s.name]) for s in specs], tensor, into * sizes[tensor.astype(np.intp)],
            sizes[tensor.astype(np.intp)], hashes,
        )
        models = np.tile(wanted, width)
        columns = tensor.astype(np.int64)
        verify_rows(models, columns, hashes, self._stored[models, columns], self._where)
        for spec in specs:
            _check_bool(spec, packing.byte_view(out[spec.name]), self._where)
        return ModelSet._trusted(self._architecture, out, len(wanted))

    def __repr__(self) -> str:
        return f"MappedModelSet({self._where}, n_models={self._n_models}, tensors={len(self._architecture)})"


def _check_bool(spec, data: np.ndarray, where: str) -> None:
    if spec.dtype == torch.bool and data.size and int(data.max()) > 1:
        raise IntegrityError(f"bool tensor {spec.name!r} of {where} holds a byte other than 0 and 1: "
                             "the data is corrupt")


def load_mapped(f: str | os.PathLike[str] | BinaryIO, *, verify: bool = True) -> MappedModelSet:
    """The model set of an uncompressed stacked file, its tensors mapping the file (module docstring)."""
    if isinstance(f, (str, os.PathLike)):
        path = os.fspath(f)
        with open(path, "rb", buffering=0) as stream:
            return _mapped(stream, path, verify)
    if not hasattr(f, "fileno"):
        raise InvalidArgumentError("mmap=True maps a file: give a path or a file object with a descriptor")
    return _mapped(f, getattr(f, "name", "the file"), verify)


def _mapped(stream: BinaryIO, name, verify: bool) -> MappedModelSet:
    start = stream.tell()
    with _io.FileReader(stream) as source:
        header = read_header(source)
        if header.layout.kind != STACKED or header.layout.chunking is not None:
            raise FormatError("mmap=True maps the tensors of an uncompressed file of a whole set; this one is "
                              f"{'compressed' if header.layout.chunking is not None else 'a rows-layout object'}: "
                              "load it without mmap")
        check_size(source, header)
        if verify:
            check_padding(source, header)
        stored = read_hash_table(source, header)
    where = f"the mapped file {name}" if isinstance(name, str) else "the mapped file"
    whole = np.memmap(stream, dtype=np.uint8, mode="c", offset=start, shape=(header.file_size,)) \
        if header.file_size else np.zeros(0, np.uint8)
    tensors = {}
    for spec, offset in zip(header.architecture.tensors, header.layout.tensor_offsets):
        length = header.n_models * spec.nbytes
        if length == 0:
            tensors[spec.name] = torch.empty((header.n_models, *spec.shape), dtype=spec.dtype)
            continue
        at = header.data_start + offset
        raw = torch.from_numpy(whole[at : at + length])
        tensors[spec.name] = raw.view(spec.dtype).view(header.n_models, *spec.shape)
    mapped = MappedModelSet.__new__(MappedModelSet)
    mapped._architecture = header.architecture
    mapped._n_models = header.n_models
    mapped._tensors = tensors
    mapped._stored = stored
    mapped._where = where
    return mapped
