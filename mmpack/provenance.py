"""Provenance records: how a set of models was trained, enough to train it again and check the result.

A :class:`Provenance` names the training function by import path with a
hash of its module's source, its JSON configuration, the environment it ran
in, and for each updated model the dataset it was trained on (a
:class:`DatasetRef`: location, size, content hash) and the kind of update.
Datasets live outside the repository, as in the paper; the repository stores
only these references.

A training function has the signature::

    fn(models: ModelSet, datasets: list[numpy.ndarray], kinds: list[str],
       config: dict, model_ids: numpy.ndarray) -> ModelSet

and must give each model a result that depends only on that model's weights,
dataset, id and the config (not on which other models share the call, nor on
the thread count): recovery retrains models alone or in other groups, on
other workers, and checks every retrained tensor against the stored hashes.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import os
import platform
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import xxhash

from mmpack.errors import MMPackError, ProvenanceError
from mmpack.modelset import ModelSet

__all__ = ["DatasetRef", "Provenance", "TrainingFunction", "UpdateKind", "capture_environment"]

UpdateKind = Literal["full", "partial"]
TrainingFunction = Callable[[ModelSet, list[np.ndarray], list[str], dict[str, Any], np.ndarray], ModelSet]
_KINDS = ("full", "partial")
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DatasetRef:
    """Where a dataset lives and what it contains: ``DatasetRef(uri, size, xxh3)``.

    ``uri`` is a local path (or ``file://`` URI); ``xxh3`` the 16-hex-digit
    XXH3-64 of the file's bytes.

    Reading checks the file before trusting it: it must be a regular file
    (a FIFO, a device such as ``/dev/zero``, a directory or a socket is
    refused without blocking on it) of exactly the recorded size, and at
    most ``size + 1`` bytes are ever read, so a file that grew, shrank or
    changed, or was swapped for something that never ends, is reported
    within one read of the recorded size.

    Example::

        ref = DatasetRef.of_file("data/cycle001/cell000017.npy")
        raw = ref.read()  # raises ProvenanceError if the file is gone or changed
    """

    uri: str
    size: int
    xxh3: str

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str):
            raise ProvenanceError(f"dataset uri must be a string, not {type(self.uri).__name__}")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 0:
            raise ProvenanceError(f"dataset size of {self.uri!r} must be a byte count, got {self.size!r}")
        if not isinstance(self.xxh3, str) or len(self.xxh3) != 16 or any(c not in _HEX for c in self.xxh3):
            raise ProvenanceError(f"dataset hash of {self.uri!r} must be 16 lowercase hex digits, got {self.xxh3!r}")

    @classmethod
    def of_bytes(cls, uri: str, content: bytes) -> DatasetRef:
        """The reference of a dataset whose bytes are at hand (just written, say)."""
        return cls(uri, len(content), f"{xxhash.xxh3_64_intdigest(content):016x}")

    @classmethod
    def of_file(cls, path: str | os.PathLike[str]) -> DatasetRef:
        """Hash a dataset file (streamed: datasets may be large; a FIFO or device is refused)."""
        digest = xxhash.xxh3_64()
        size = 0
        try:
            fd, _ = _open_regular(os.fspath(path))
        except _Unusable as exc:
            raise ProvenanceError(f"cannot record dataset {os.fspath(path)}: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return cls(os.path.abspath(path), size, f"{digest.intdigest():016x}")

    @property
    def path(self) -> str:
        """The dataset's local path (``uri`` without a ``file://`` prefix)."""
        return self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri

    def problem(self) -> str | None:
        """What is wrong with the dataset now (missing, not a file, other size, other content), or None."""
        try:
            self._content()
        except _Unusable as exc:
            return f"{exc}: {self.uri}" if exc.short else f"dataset {exc}: {self.uri}"
        return None

    def read(self) -> bytes:
        """The dataset's bytes, after checking type, size and content hash (ProvenanceError otherwise)."""
        try:
            return self._content()
        except _Unusable as exc:
            raise ProvenanceError(f"{exc}: {self.uri}" if exc.short else f"dataset {exc}: {self.uri}") from None

    def _content(self) -> bytes:
        try:
            fd, info = _open_regular(self.path)
        except FileNotFoundError:
            raise _Unusable("dataset missing", short=True) from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            if info.st_size != self.size:
                raise _Unusable(f"size differs ({info.st_size} bytes, recorded {self.size})")
            content = bytearray(self.size + 1)  # one byte more: a file still growing shows here
            view, got = memoryview(content), 0
            try:
                while got < len(content) and (n := f.readinto(view[got:])):
                    got += n
            except OSError as exc:
                raise _Unusable(f"unreadable ({exc.strerror or exc})") from None
            finally:
                view.release()
        if got != self.size:
            change = "grew" if got > self.size else "shrank"
            raise _Unusable(f"changed while being read ({change} past the recorded {self.size} bytes)")
        del content[self.size :]
        if f"{xxhash.xxh3_64_intdigest(content):016x}" != self.xxh3:
            raise _Unusable("dataset content hash differs", short=True)
        return bytes(content)


class _Unusable(Exception):
    """Why a dataset cannot be used (``short``: the message already says "dataset ...")."""

    def __init__(self, reason: str, *, short: bool = False) -> None:
        super().__init__(reason)
        self.short = short


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` and its fstat, if it is a regular file (:class:`_Unusable` otherwise;
    FileNotFoundError if absent). Opened non-blocking: opening a FIFO then returns at once instead of
    waiting for a writer; the type is read from the descriptor, so a swap after the check cannot fool it."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise _Unusable(f"unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
            raise _Unusable(f"is not a regular file but {kind}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def capture_environment(threads: int | None = None) -> dict[str, str]:
    """What can change a training result: interpreter, library versions, CPU kernels, threads, flags."""
    from mmpack import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "mmpack": __version__,
        "platform": f"{platform.system()}-{platform.machine()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": str(threads if threads is not None else torch.get_num_threads()),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
    }


def function_path(fn: Callable[..., Any]) -> str:
    """``"package.module:qualified.name"`` of a module-level function."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not name or "<" in name or module == "__main__":
        raise ProvenanceError(
            f"training function {fn!r} must be importable by path (a module-level function, not in __main__)"
        )
    return f"{module}:{name}"


def source_hash(fn: Callable[..., Any]) -> str:
    """XXH3-64 of the source of the module defining ``fn`` (helpers it calls there included)."""
    module = sys.modules.get(fn.__module__)
    try:
        text = inspect.getsource(module) if module is not None else inspect.getsource(fn)
    except (OSError, TypeError):
        raise ProvenanceError(f"cannot read the source of {function_path(fn)} to record its hash") from None
    return f"{xxhash.xxh3_64_intdigest(text.encode()):016x}"


def resolve_function(
    path: str, training: Mapping[str, TrainingFunction] | None, allow_import: bool
) -> TrainingFunction:
    """The training function named ``path``: from ``training`` if given there, else imported if allowed.

    Importing runs code named by the repository; it happens only when the
    caller says so (``allow_import=True``) or hands the function over.
    """
    if training and path in training:
        return training[path]
    if not allow_import:
        raise ProvenanceError(
            f"recovering this version retrains models with {path!r}; pass training={{{path!r}: function}} "
            "or allow_import=True to let mmpack import it"
        )
    module_name, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ProvenanceError(f"training function {path!r} cannot be imported: {exc}") from None
    return target


@dataclass(frozen=True)
class Provenance:
    """How one version's updated models were trained: ``Provenance.of(fn, config, updates)``.

    ``updates`` maps a model's index in the set to ``(DatasetRef, kind)``,
    kind being ``"full"`` (every layer retrained) or ``"partial"``.

    Example::

        prov = Provenance.of(finetune, {"steps": 60, "seed": 0}, {17: (ref, "full"), 42: (ref2, "partial")})
        vid = repo.save(models, approach="provenance", base=previous, provenance=prov)
    """

    function: str
    source_hash: str
    config: dict[str, Any]
    updates: dict[int, tuple[DatasetRef, UpdateKind]]
    environment: dict[str, str] = field(default_factory=capture_environment)
    training_seconds: float | None = None  # how long the training took, for the advisor's estimates

    @classmethod
    def of(
        cls,
        fn: TrainingFunction,
        config: Mapping[str, Any],
        updates: Mapping[int, tuple[DatasetRef, UpdateKind]],
        training_seconds: float | None = None,
    ) -> Provenance:
        """Record ``fn`` (by import path and source hash), ``config``, ``updates`` and this environment;
        ``training_seconds`` (optional) is how long training the updates took, which lets
        ``approach="auto"`` weigh recovery by retraining."""
        threads = config.get("threads") if isinstance(config, Mapping) else None
        return cls(function_path(fn), source_hash(fn), dict(config), dict(updates), capture_environment(threads),
                   training_seconds)

    def __post_init__(self) -> None:
        for model, entry in self.updates.items():
            if not isinstance(model, (int, np.integer)) or model < 0:
                raise ProvenanceError(f"provenance update key {model!r} is not a model index")
            if (
                not isinstance(entry, tuple)
                or len(entry) != 2
                or not isinstance(entry[0], DatasetRef)
                or entry[1] not in _KINDS
            ):
                raise ProvenanceError(f"provenance of model {model} must be (DatasetRef, 'full' | 'partial')")
        try:
            import json

            json.dumps(self.config)
        except (TypeError, ValueError) as exc:
            raise ProvenanceError(f"provenance config must be JSON-serialisable: {exc}") from None

    def models(self) -> np.ndarray:
        """The updated models' indices, ascending."""
        return np.array(sorted(self.updates), dtype=np.int64)

    def environment_differences(self, current: Mapping[str, str] | None = None) -> list[str]:
        """Fields of the recorded environment that differ from ``current`` (this process by default)."""
        if current is None:
            recorded_threads = self.environment.get("torch_threads", "")
            current = capture_environment(int(recorded_threads) if recorded_threads.isdigit() else None)
        now = dict(current)
        return [
            f"{key}: recorded {self.environment.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(set(self.environment) | set(now))
            if self.environment.get(key) != now.get(key)
        ]

    def to_json(self) -> dict[str, Any]:
        """Compact JSON form: per-model columns as base64 arrays, URIs as a list."""
        models = self.models()
        refs = [self.updates[int(m)][0] for m in models]
        return {
            "function": self.function,
            "source_xxh3": self.source_hash,
            "config": self.config,
            "environment": self.environment,
            "models": _b64(models.astype("<u4")),
            "kinds": _b64(np.array([_KINDS.index(self.updates[int(m)][1]) for m in models], dtype=np.uint8)),
            "dataset_sizes": _b64(np.array([r.size for r in refs], dtype="<u8")),
            "dataset_xxh3": _b64(np.array([int(r.xxh3, 16) for r in refs], dtype="<u8")),
            "dataset_uris": [r.uri for r in refs],
            "training_seconds": self.training_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Provenance:
        try:
            models = np.frombuffer(base64.b64decode(data["models"], validate=True), dtype="<u4")
            kinds = np.frombuffer(base64.b64decode(data["kinds"], validate=True), dtype=np.uint8)
            sizes = np.frombuffer(base64.b64decode(data["dataset_sizes"], validate=True), dtype="<u8")
            hashes = np.frombuffer(base64.b64decode(data["dataset_xxh3"], validate=True), dtype="<u8")
            uris = list(data["dataset_uris"])
            if not len(models) == len(kinds) == len(sizes) == len(hashes) == len(uris):
                raise ValueError("columns of different lengths")
            if len(models) > 1 and not np.all(models[1:] > models[:-1]):
                raise ValueError("model ids are not strictly ascending")
            if not all(isinstance(u, str) for u in uris) or np.any(kinds >= len(_KINDS)):
                raise ValueError("a dataset uri that is not a string, or an unknown update kind")
            if not all(isinstance(data[k], str) for k in ("function", "source_xxh3")):
                raise ValueError("function and source_xxh3 must be strings")
            if not isinstance(data["config"], dict) or not isinstance(data["environment"], dict):
                raise ValueError("config and environment must be JSON objects")
            updates = {
                int(m): (DatasetRef(str(u), int(s), f"{int(h):016x}"), _KINDS[int(k)])
                for m, k, s, h, u in zip(models, kinds, sizes, hashes, uris)
            }
            seconds = data.get("training_seconds")
            return cls(str(data["function"]), str(data["source_xxh3"]), dict(data["config"]), updates,
                       {str(k): str(v) for k, v in data["environment"].items()},
                       float(seconds) if seconds is not None else None)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MMPackError(f"malformed provenance record: {exc!r}") from None


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()

