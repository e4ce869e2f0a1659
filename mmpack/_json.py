"""Strict reading of the JSON documents mmpack writes (headers, manifests, records).

``json.loads`` accepts more than mmpack's specifications allow: duplicate
keys (the last one wins), ``NaN`` and ``Infinity``, and floats where an
integer is meant (``64.0 == 64`` in Python, so a comparison would not notice).
Everything here rejects those, so a document is read the same way by every
reader that follows the spec. Problems raise :class:`Malformed`, which each
caller turns into the typed error of its document (``FormatError`` for object
headers, ``RepositoryError`` for repository documents).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

_HEX64 = re.compile(r"[0-9a-f]{16}")


class Malformed(ValueError):
    """A document that does not follow its specification; the message says where."""


def loads(raw: bytes | str) -> Any:
    """Parse UTF-8 JSON, rejecting duplicate keys and non-finite number constants."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise Malformed(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise Malformed("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise Malformed(f"not valid JSON ({exc.msg} at character {exc.pos})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Malformed(f"key {duplicate!r} appears twice in one object")
    return found


def _no_constant(name: str) -> Any:
    raise Malformed(f"{name} is not a JSON number")


def fields(
    value: Any, required: Collection[str], optional: Collection[str] = (), what: str = "document"
) -> dict[str, Any]:
    """``value`` as an object with exactly the ``required`` keys plus any of ``optional``."""
    if not isinstance(value, dict):
        raise Malformed(f"{what} must be a JSON object, not {_kind(value)}")
    missing = [k for k in required if k not in value]
    unknown = sorted(k for k in value if k not in required and k not in optional)
    if missing or unknown:
        raise Malformed(
            f"{what} must have keys {sorted(required)}"
            + (f" (optional {sorted(optional)})" if optional else "")
            + f"; missing {missing}, unknown {unknown}"
        )
    return value


def integer(value: Any, what: str, minimum: int = 0, limit: int = 2**63) -> int:
    """An integer in ``[minimum, limit)``; floats and booleans are not integers."""
    if type(value) is not int or not minimum <= value < limit:
        raise Malformed(f"{what} must be an integer from {minimum} to {limit - 1}, not {value!r}")
    return value


def string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{what} must be a string, not {_kind(value)}")
    return value


def hex64(value: Any, what: str) -> int:
    """A 64-bit digest written as 16 lowercase hex digits."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise Malformed(f"{what} must be 16 lowercase hex digits, not {value!r}")
    return int(value, 16)


def same(value: Any, expected: Any) -> bool:
    """Structural equality that also compares types (``64.0``, ``True`` and ``64`` differ)."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, dict):
        return value.keys() == expected.keys() and all(same(value[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        return len(value) == len(expected) and all(same(a, b) for a, b in zip(value, expected))
    return value == expected


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
