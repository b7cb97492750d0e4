"""JSON text of plain values written by orjson: a third of the standard library's time on a Result.

The audit store's JSON columns and the result backend's Result meta are on every request's path. orjson
writes compact text that reads back (``json.loads``) to the same values, but some values it writes
differently from the standard library (NaN and infinities as ``null``) or refuses (integers beyond 64
bits, keys that are not strings, float subclasses such as NumPy's), and it writes non-ASCII characters
as they are where the standard library escapes them (``\\u00fc``; a PostgreSQL ``json`` column keeps the
text as given, and a server encoding other than UTF-8 could not hold them). So its text is used only
when it is ASCII and reads back equal to the value (orjson's own parser checks that at C speed);
anything else is encoded the way it always was.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps_plain(value: Any) -> bytes | None:
    """orjson's JSON bytes of ``value`` if they are ASCII and read back equal to it, else None (the caller
    encodes it its own way: a NaN, a tuple, a NumPy scalar, a big integer, a key that is not a string, a
    non-ASCII character)."""
    try:
        out = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    return out if out.isascii() and orjson.loads(out) == value else None


def dumps(value: Any) -> str:
    """JSON text of ``value``: orjson's when `dumps_plain` gives it, else ``json.dumps``'s (the audit store's
    JSON serializer: SQLAlchemy calls it for every JSON column it writes)."""
    out = dumps_plain(value)
    return out.decode() if out is not None else json.dumps(value)
