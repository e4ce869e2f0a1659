"""Publishing a key exactly once on object storage: conditional PUTs, or claims where there are none.

* **Conditional PUT** (S3's ``If-None-Match: *``; AWS, MinIO, Ceph, R2 and
  moto honour it): the server creates the object only if the key is free,
  atomically. One request. A random token in the object's metadata tells a
  retried request that meets its own first attempt from another writer.
* **Claims** (file systems without conditional writes): the writer PUTs a
  unique claim beside the key, lists the claims, and writes the key only if
  its claim is the only live one and the key is still absent. Correct on
  any store whose listings are strongly consistent, as long as no writer
  stalls for longer than the lease between its claim and its write.

See docs/DESIGN-NOTES.md ("Repositories on object storage") for the exact
guarantees. These functions are the :class:`~mmpack.store.FsspecStore`'s
(their ``store`` argument); they send its requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import time
from typing import Any

from mmpack.errors import MMPackError, RepositoryError
from mmpack.store.filesystems import mtime
from mmpack.store.s3 import Content

INTERNAL_PREFIX = "_mmpack"  # claims and probes; never listed, removed by clean_temporaries
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted"}
_MAX_ATTEMPTS = 200


def create_conditionally(store: Any, path: str, content: Content) -> bool:
    """Create ``path`` with one create-only PUT (S3 ``If-None-Match: *``); False if it exists."""
    token = secrets.token_hex(10)
    for attempt in range(_MAX_ATTEMPTS):
        try:
            store._write(path, content, create=True, token=token)
            return True
        except FileExistsError:
            # A request retried after its first attempt succeeded also ends here; the token
            # it wrote tells it from another writer's object.
            with store._errors("read the metadata of", path):
                return store._s3.writer_token(path) == token
        except OSError as exc:
            if _error_code(exc) not in _CONFLICT_CODES:
                raise
            _backoff(attempt)  # two conditional PUTs of one key in flight: S3 asks to retry
    raise RepositoryError(f"could not create {path}: the store kept reporting conflicting writes")

def create_with_claim(store: Any, key: str, path: str, content: Content) -> bool:
    """Create ``key`` (at ``path``) with a claim: correct where listings are strongly consistent and
    no writer stalls for ``store.lease_seconds`` between its claim and its write."""
    claims = f"{store.root}/{INTERNAL_PREFIX}/claims/{key}"
    patience = 3 * store.lease_seconds + 30  # outlasts any claim a killed writer left
    deadline = time.monotonic() + patience
    attempt = 0
    while time.monotonic() < deadline:
        mine = f"{claims}/{secrets.token_hex(10)}"
        started = time.monotonic()
        store._write(mine, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
        try:
            times = {info["name"]: mtime(info) for info in store._list_files(claims)}
            if mine not in times:
                raise RepositoryError(
                    f"{store.url} did not list a claim just written: its listings are not strongly "
                    "consistent, so keys cannot be published safely without conditional writes"
                )
            stale = [n for n, t in times.items() if n != mine and times[mine] - t > store.lease_seconds]
            for name in stale:  # left by a killed writer: ignored, and removed on the way
                store._remove(name)
            alone = len(times) - len(stale) == 1
            if alone:
                if store.exists(key):
                    return False
                # Past half the lease, another writer may already treat this claim as stale.
                if time.monotonic() - started < store.lease_seconds / 2:
                    store._write(path, content)
                    return True
        finally:
            store._remove(mine)
        _backoff(attempt)
        attempt += 1
    raise RepositoryError(f"could not publish {key} within {patience:.0f} s: other writers kept claiming it")

def probe_conditional_writes(store: Any) -> bool:
    """Whether the server refuses a second create-only PUT of one key (some S3 look-alikes
    ignore ``If-None-Match`` and would silently overwrite)."""
    if store._s3 is None:
        return False
    probe = f"{store.root}/{INTERNAL_PREFIX}/probes/{secrets.token_hex(10)}"
    try:
        store._put(probe, b"", create=True)
        try:
            store._put(probe, b"", create=True)
        except FileExistsError:
            return True
        return False
    except MMPackError:
        raise
    except Exception:  # the server or client rejects the header itself: no conditional writes
        return False
    finally:
        with contextlib.suppress(Exception):
            store._remove(probe)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (it keeps the botocore error as cause,
    and a StorageError keeps s3fs's as its own)."""
    cause = exc.__cause__
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        cause = cause.__cause__
    return None


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.5, 1.0) * min(1.0, 0.02 * 2 ** min(attempt, 10)))
