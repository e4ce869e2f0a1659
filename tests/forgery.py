"""Editing a repository's version records as an attacker (or a bad tool) would: every copy of the
record changed, and every checksum recomputed, so only mmpack's own checks stand in the way.

Format 1 keeps a record in its manifest; format 2 in every commit of the log since the last
checkpoint (commits repeat the entries since their checkpoint) and in HEAD, the newest commit's
copy. Tests keep their repositories below the first checkpoint, so no checkpoint holds a record.
"""

from __future__ import annotations

import json
import os

from mmpack import _native


def _paths(root) -> list[str]:
    log = os.path.join(root, "catalog", "log")
    found = [os.path.join(log, n) for n in sorted(os.listdir(log)) if n.endswith(".json")]
    return [*found, os.path.join(root, "catalog", "HEAD.json")]


def _read_signed(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read().partition(b"\n")[0])


def _write_signed(path: str, body: dict) -> None:
    encoded = json.dumps(body, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(encoded + f"\nxxh3-64:{_native.xxh3_64(encoded):016x}\n".encode())


def read_record(root, vid: str) -> dict:
    """The JSON record of version ``vid`` as the newest commit has it."""
    if not os.path.isdir(os.path.join(root, "catalog")):
        body = _read_signed(os.path.join(root, "versions", f"{vid}.json"))
        return {k: v for k, v in body.items() if k not in ("format", "format_version")}
    for path in reversed(_paths(root)[:-1]):
        for entry in _read_signed(path)["entries"]:
            if entry.get("op") == "version" and entry["record"].get("id") == vid:
                return json.loads(json.dumps(entry["record"]))
    raise KeyError(vid)


def write_record(root, vid: str, record: dict) -> None:
    """Replace every copy of version ``vid``'s record by ``record``, checksums recomputed."""
    if not os.path.isdir(os.path.join(root, "catalog")):
        body = {"format": "mmpack-version", "format_version": 2, **record}
        _write_signed(os.path.join(root, "versions", f"{vid}.json"), body)
        return
    for path in _paths(root):
        if not os.path.exists(path):
            continue
        body = _read_signed(path)
        touched = False
        for entry in body["entries"]:
            if entry.get("op") == "version" and entry["record"].get("id") == vid:
                entry["record"] = json.loads(json.dumps(record))
                touched = True
        if touched:
            _write_signed(path, body)
