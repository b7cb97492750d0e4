"""What producers and workers must agree on about a request, with no SQLAlchemy import (a producer stays light).

The request-id rule, the limits of a request's metadata columns, and the Result of a stored verdict row
(docs/CONTRACTS.md). The SDK and the gateway refuse what breaks these before anything is sent; a worker
answers a message that breaks them anyway (another client, an older SDK) with ``invalid_input``, never with
a database error and no verdict row.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: the longest request id (the audit store's key columns)
REQUEST_ID_LEN = 64
#: a request id: 1 to 64 characters of ``[A-Za-z0-9._:-]``, not only dots (``.`` and ``..`` name no URL
#: path segment and no file of their own); the length is checked apart (``REQUEST_ID_LEN``)
REQUEST_ID_PATTERN = r"^\.*[A-Za-z0-9_:-][A-Za-z0-9._:-]*$"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
#: the longest ``client`` and ``source`` text of a request (``String(256)`` columns)
TEXT_LEN = 256
#: a request's ``label``: a 32-bit signed integer (PostgreSQL ``integer``)
LABEL_MIN, LABEL_MAX = -(2**31), 2**31 - 1
#: the ImageRef kinds a request row records (``requests.image_ref``)
IMAGE_REF_KINDS = ("inline", "redis_key", "path", "array", "part")
#: ``submitted_at`` a producer may send: epoch seconds from 1970 up to the year 3000
_EPOCH_MAX = 32_503_680_000.0


def valid_request_id(value: Any) -> bool:
    """Whether ``value`` is a request id a client may use (see ``REQUEST_ID_PATTERN``)."""
    return isinstance(value, str) and len(value) <= REQUEST_ID_LEN and _REQUEST_ID_RE.fullmatch(value) is not None


def request_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid request id, in words; None when it is one."""
    if valid_request_id(value):
        return None
    shown = value if isinstance(value, str) and len(value) <= 80 else type(value).__name__
    return (f"invalid request id {shown!r}: use 1 to {REQUEST_ID_LEN} characters of letters, digits and "
            ". _ : -, not only dots")


def metadata_problem(*, client: Any = None, source: Any = None, label: Any = None) -> str | None:
    """Why a request's ``client``, ``source`` or ``label`` cannot be stored, in words; None when all can."""
    for name, value in (("client", client), ("source", source)):
        if value is not None and (not isinstance(value, str) or len(value) > TEXT_LEN):
            what = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
            return f"bad request: {name} must be text of at most {TEXT_LEN} characters, got {what}"
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, int):
            return f"bad request: label must be an integer, got {type(label).__name__}"
        if not LABEL_MIN <= label <= LABEL_MAX:
            return f"bad request: label {label} is outside {LABEL_MIN}..{LABEL_MAX} (a 32-bit integer)"
    return None


def as_epoch(value: Any) -> float | None:
    """``submitted_at`` as epoch seconds, or None when it is missing or no time we can store (not a number,
    not finite, before 1970 or after the year 3000); an ISO 8601 string is read too."""
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    except (TypeError, ValueError):
        if not isinstance(value, str):
            return None
        from datetime import datetime, timezone

        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return None
        seconds = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    return seconds if math.isfinite(seconds) and 0.0 <= seconds < _EPOCH_MAX else None


def result_from_verdict(row: dict[str, Any]) -> dict[str, Any]:
    """The Result of a stored ``verdicts`` row (``db.repo.row_dict``): what a redelivered request returns and
    what the gateway answers once the result backend has forgotten the request.

    ``topk`` only for a benign verdict: the row keeps the neighbours of rejections for the audit, but a client
    must not get retrieval feedback on an image that was refused.
    """
    scores = None
    if row.get("c1") is not None or row.get("combined") is not None or row.get("extra_scores"):
        scores = {k: row.get(k) for k in ("c1", "c2", "c3", "combined") if row.get(k) is not None}
        scores.update(row.get("extra_scores") or {})  # an extension detector's other criteria
    benign = row["verdict"] == "benign"
    return {
        "request_id": row["request_id"],
        "kind": row["kind"],
        "verdict": row["verdict"],
        "reasons": list(row.get("reasons") or []),
        "fired": list(row.get("fired") or []),
        "scores": scores,
        "thresholds": row.get("thresholds"),
        "topk": row.get("topk") if benign else None,
        "image_id": row.get("image_id"),
        "model_version": row.get("model_version"),
        "calibration_id": row.get("calibration_id"),
        "detector": row.get("detector"),
        "batch_size": row.get("batch_size") or 0,
        "latency_ms": {k: row.get(f"latency_{k}_ms") for k in ("queue", "model", "search", "total")},
        "worker": row.get("worker"),
    }
