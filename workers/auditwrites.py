"""Multi-row audit-store writes for one model batch: its request rows and verdict rows in one statement each."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db import repo
from db.models import KINDS, VERDICTS, Request, Verdict, utcnow

_REQUEST_COLUMNS = tuple(c.key for c in Request.__table__.columns)
_VERDICT_COLUMNS = tuple(c.key for c in Verdict.__table__.columns if c.key != "id")
_VERDICT_COLUMN_SET = frozenset(_VERDICT_COLUMNS)


def _insert(session: Session, table: Table):
    """A dialect ``insert()`` of ``table`` that supports ``on_conflict_do_nothing``."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the audit store supports sqlite and postgresql, not {name}")


def record_requests(session: Session, requests: Sequence[Mapping[str, Any]]) -> None:
    """Record many requests at once, each only if its request id is new (as ``repo.record_request``).

    ``requests``: keyword arguments of ``repo.record_request`` (``ScreenRequest.request_fields()``);
    times are datetimes or epoch seconds. One ``INSERT ... ON CONFLICT DO NOTHING`` executed for all.
    """
    if not requests:
        return
    rows = []
    now = utcnow()
    for fields in requests:
        if fields.get("kind") not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {fields.get('kind')!r}")
        image_ref = fields.get("image_ref")
        if isinstance(image_ref, Mapping):
            image_ref = next(iter(image_ref), None)
        row = {key: fields.get(key) for key in _REQUEST_COLUMNS}
        row.update(image_ref=image_ref, submitted_at=repo.as_datetime(fields.get("submitted_at")),
                   received_at=repo.as_datetime(fields.get("received_at")) or now)
        rows.append(row)
    stmt = _insert(session, Request.__table__).on_conflict_do_nothing(index_elements=["request_id"])
    session.execute(stmt, rows)


def write_verdicts(session: Session, verdicts: Sequence[Mapping[str, Any]]) -> set[str]:
    """Write many verdicts at once, each only if its request has none yet; returns the request ids written.

    ``verdicts``: ``verdicts`` columns (``repo.verdict_fields_from_result``), as ``repo.write_verdict``
    takes them. A request id already holding a verdict (a redelivery) keeps its first one and is
    absent from the returned set.
    """
    if not verdicts:
        return set()
    rows = []
    now = utcnow()
    for fields in verdicts:
        unknown = fields.keys() - _VERDICT_COLUMN_SET
        if unknown:
            raise TypeError(f"unknown verdict fields: {sorted(unknown)}")
        if fields.get("verdict") not in VERDICTS or fields.get("kind") not in KINDS:
            raise ValueError(f"bad verdict or kind: {fields.get('verdict')!r}, {fields.get('kind')!r}")
        row = {key: fields.get(key) for key in _VERDICT_COLUMNS}
        row["reasons"] = list(fields.get("reasons") or [])
        row["fired"] = list(fields.get("fired") or [])
        row["created_at"] = fields.get("created_at") or now
        rows.append(row)
    table = Verdict.__table__
    stmt = (_insert(session, table).on_conflict_do_nothing(index_elements=["request_id"])
            .returning(table.c.request_id))
    return set(session.execute(stmt, rows).scalars())
