"""Small repository functions over the audit store; each takes a Session and leaves the commit to its caller."""

# Writes that a redelivered task may repeat are idempotent on the request id (INSERT ... ON CONFLICT
# DO NOTHING on both SQLite and PostgreSQL). Writers of ``index_log`` take a transaction-scoped lock
# on PostgreSQL, so log rows commit in ``seq`` order and a replica that reads ``seq > watermark``
# never skips a row that commits late (SQLite serialises writers by itself).

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import String, case, cast, func, insert, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    CRITERIA,
    IMAGE_STATUSES,
    KINDS,
    REQUEST_ID_LEN,
    VERDICTS,
    AttackSet,
    Base,
    Calibration,
    DbImage,
    EvalRun,
    ImageCode,
    IndexLog,
    ModelVersion,
    Request,
    TrainRun,
    Verdict,
    utcnow,
)

LogRow = tuple[int, str, int, bytes | None]  # (seq, op, image_id, code)

_CHUNK = 500  # rows per multi-row INSERT (well under SQLite's bound-parameter limit)
_VERDICT_COLUMNS = frozenset(c.key for c in Verdict.__table__.columns) - {"id"}


# --------------------------------------------------------------------------- helpers


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _insert(session: Session, model: type[Base]):
    """A dialect ``insert()`` of ``model`` that supports ``on_conflict_do_nothing``."""
    name = _dialect(session)
    if name == "postgresql":
        return postgresql.insert(model)
    if name == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"the audit store supports sqlite and postgresql, not {name}")


def _xact_lock(session: Session, name: str) -> None:
    """On PostgreSQL, an advisory lock named ``name`` held until the transaction ends."""
    if _dialect(session) == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(name.encode())})


def _lock_index_log(session: Session) -> None:
    _xact_lock(session, "umcd.index_log")


def lock_seeding(session: Session) -> None:
    """Serialise publishers seeding the database until the transaction ends (PostgreSQL; on SQLite the
    caller's write session holds the store's write lock), so that two cannot both find it empty."""
    _xact_lock(session, "umcd.seed")


def as_datetime(value: datetime | float | int | str | None) -> datetime | None:
    """A timezone-aware UTC datetime from a datetime, epoch seconds or ISO-8601 text (None stays None)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    return as_datetime(datetime.fromisoformat(value))


def _as_code(code: Any) -> bytes:
    """Packed code bytes from bytes, bytearray, memoryview or any buffer (a uint8 numpy array)."""
    if isinstance(code, bytes):
        return code
    return bytes(memoryview(code))


def _check_request_id(request_id: str) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("request_id must be a non-empty string")
    if len(request_id) > REQUEST_ID_LEN:
        raise ValueError(f"request_id longer than {REQUEST_ID_LEN} characters: {request_id[:80]!r}")
    return request_id


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def row_dict(obj: Base | None) -> dict[str, Any] | None:
    """The column values of a model instance as a dict (None stays None)."""
    if obj is None:
        return None
    return {c.key: getattr(obj, c.key) for c in obj.__table__.columns}


# --------------------------------------------------------------------------- requests and verdicts


def record_request(
    session: Session,
    request_id: str,
    kind: str,
    *,
    client: str | None = None,
    source: str | None = None,
    label: int | None = None,
    image_bytes: int | None = None,
    image_ref: str | Mapping[str, Any] | None = None,
    submitted_at: datetime | float | str | None = None,
    received_at: datetime | float | str | None = None,
) -> bool:
    """Record a request once; returns True if this call inserted it, False if it was there already.

    ``image_ref`` is the reference kind (``inline`` | ``redis_key`` | ``path``) or the ImageRef dict
    itself (only its kind is stored); ``submitted_at``/``received_at`` are datetimes or epoch seconds.
    """
    if isinstance(image_ref, Mapping):
        image_ref = next(iter(image_ref), None)
    stmt = (
        _insert(session, Request)
        .values(
            request_id=_check_request_id(request_id),
            kind=_check(kind, KINDS, "kind"),
            client=client,
            source=source,
            label=label,
            image_bytes=image_bytes,
            image_ref=image_ref,
            submitted_at=as_datetime(submitted_at),
            received_at=as_datetime(received_at) or utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(Request.request_id)
    )
    return session.execute(stmt).scalar_one_or_none() is not None


#: the score names with a column of their own; any other goes to ``extra_scores``
_SCORE_COLUMNS = frozenset((*CRITERIA, "combined"))
#: the ``verdicts`` columns a Result fills, in the table's order (``id`` and ``created_at`` are the store's)
VERDICT_RESULT_COLUMNS = (
    "request_id", "kind", "verdict", "reasons", *CRITERIA, "combined", "extra_scores", "thresholds", "fired",
    "detector", "model_version", "calibration_id", "batch_size", "latency_queue_ms", "latency_model_ms",
    "latency_search_ms", "latency_total_ms", "worker", "image_id", "topk",
)


def verdict_values_from_result(result: Mapping[str, Any]) -> list[Any]:
    """The ``verdicts`` values of a worker's Result dict, in ``VERDICT_RESULT_COLUMNS`` order (a worker's batch
    writes these lists as they are: :func:`verdict_fields_from_result` names them)."""
    get = result.get
    scores = get("scores") or {}
    latency = get("latency_ms") or {}
    score, lat = scores.get, latency.get
    return [
        result["request_id"], result["kind"], result["verdict"], list(get("reasons") or ()),
        *map(score, CRITERIA), score("combined"),
        # the criteria of extension detectors (trust@in, ...)
        None if scores.keys() <= _SCORE_COLUMNS else {k: v for k, v in scores.items() if k not in _SCORE_COLUMNS},
        get("thresholds"), list(get("fired") or ()), get("detector"), get("model_version"), get("calibration_id"),
        get("batch_size"), lat("queue"), lat("model"), lat("search"), lat("total"), get("worker"), get("image_id"),
        get("topk"),
    ]


def verdict_fields_from_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``verdicts`` columns of a worker's Result dict (see docs/CONTRACTS.md)."""
    return dict(zip(VERDICT_RESULT_COLUMNS, verdict_values_from_result(result)))


def write_verdict(session: Session, **fields: Any) -> bool:
    """Write the verdict of ``fields["request_id"]`` once; True if inserted, False if one existed.

    ``fields`` are ``verdicts`` columns (``verdict_fields_from_result`` makes them from a Result).
    A redelivered task calling this again changes nothing: the first verdict stays.
    """
    unknown = set(fields) - _VERDICT_COLUMNS
    if unknown:
        raise TypeError(f"unknown verdict fields: {sorted(unknown)}")
    _check_request_id(fields.get("request_id"))
    _check(fields.get("kind"), KINDS, "kind")
    _check(fields.get("verdict"), VERDICTS, "verdict")
    fields.setdefault("reasons", [])
    fields.setdefault("fired", [])
    fields.setdefault("created_at", utcnow())
    stmt = (
        _insert(session, Verdict)
        .values(**fields)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(Verdict.id)
    )
    # RETURNING, not rowcount: with implicit RETURNING psycopg reports rowcount -1
    return session.execute(stmt).scalar_one_or_none() is not None


def get_verdict(session: Session, request_id: str) -> Verdict | None:
    """The verdict row of ``request_id``, or None."""
    return session.scalars(select(Verdict).where(Verdict.request_id == request_id)).one_or_none()


def _by_request_id(session: Session, columns, request_ids: Sequence[str]) -> list:
    """Rows of ``columns`` (of one table, its ``request_id`` first) for ``request_ids``, one query per _CHUNK."""
    ids = list(dict.fromkeys(request_ids))
    key = columns[0]
    return [row for start in range(0, len(ids), _CHUNK)
            for row in session.execute(select(*columns).where(key.in_(ids[start:start + _CHUNK])))]


def image_paths(session: Session, request_ids: Sequence[str]) -> dict[str, str | None]:
    """request id -> ``image_path`` of its database image, for those of ``request_ids`` that have one."""
    return dict(_by_request_id(session, (DbImage.request_id, DbImage.image_path), request_ids))


def answered(session: Session, request_ids: Sequence[str]) -> set[str]:
    """Which of ``request_ids`` already have a verdict row."""
    return {rid for (rid,) in _by_request_id(session, (Verdict.request_id,), request_ids)}


# --------------------------------------------------------------------------- database images and the index log


def insert_database_image(
    session: Session,
    request_id: str | None,
    code: bytes,
    model_version: str,
    source: str | None = None,
    label: int | None = None,
    image_path: str | None = None,
    *,
    status: str = "active",
    reasons: Sequence[str] = (),
) -> int:
    """Add one image to the database and return its id (int64).

    Writes ``db_images``, its ``image_codes`` row and, when ``status`` is ``active``, an ``add`` row
    of ``index_log``, all in the session's transaction. Idempotent on ``request_id``: a redelivered
    insertion returns the existing id and writes nothing. ``code`` is the packed code (K/8 bytes).
    A ``quarantined`` image is stored but stays out of the index.
    """
    _check(status, ("active", "quarantined"), "status")
    code = _as_code(code)
    if status == "active":
        _lock_index_log(session)
    values = dict(
        request_id=request_id,
        source=source,
        label=label,
        status=status,
        reasons=list(reasons),
        image_path=image_path,
        created_at=utcnow(),
    )
    if request_id is not None:
        _check_request_id(request_id)
        stmt = (
            _insert(session, DbImage)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(DbImage.id)
        )
        image_id = session.execute(stmt).scalar_one_or_none()
        if image_id is None:  # already inserted by an earlier delivery
            return session.execute(select(DbImage.id).where(DbImage.request_id == request_id)).scalar_one()
    else:
        image_id = session.execute(insert(DbImage).values(**values).returning(DbImage.id)).scalar_one()
    session.execute(insert(ImageCode).values(image_id=image_id, model_version=model_version, code=code))
    if status == "active":
        session.execute(
            insert(IndexLog).values(
                op="add", image_id=image_id, model_version=model_version, code=code, created_at=utcnow()
            )
        )
    return int(image_id)


def add_database_images(
    session: Session,
    codes: Sequence[bytes],
    model_version: str,
    *,
    source: str | None = None,
    labels: Sequence[int | None] | None = None,
    image_paths: Sequence[str | None] | None = None,
) -> list[int]:
    """Bulk-add active images without request ids (seeding the database from a dataset).

    ``codes[i]`` is image i's packed code; returns the new ids in the same order. Writes
    ``db_images``, ``image_codes`` and ``index_log`` rows in the session's transaction.
    """
    n = len(codes)
    if labels is not None and len(labels) != n or image_paths is not None and len(image_paths) != n:
        raise ValueError("codes, labels and image_paths must have the same length")
    _lock_index_log(session)
    ids: list[int] = []
    now = utcnow()
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        rows = [
            dict(
                request_id=None,
                source=source,
                label=None if labels is None else labels[i],
                status="active",
                reasons=[],
                image_path=None if image_paths is None else image_paths[i],
                created_at=now,
            )
            for i in range(start, stop)
        ]
        chunk_ids = list(
            session.scalars(insert(DbImage).returning(DbImage.id, sort_by_parameter_order=True), rows)
        )
        chunk_codes = [_as_code(codes[i]) for i in range(start, stop)]
        session.execute(
            insert(ImageCode),
            [dict(image_id=i, model_version=model_version, code=c) for i, c in zip(chunk_ids, chunk_codes)],
        )
        session.execute(
            insert(IndexLog),
            [
                dict(op="add", image_id=i, model_version=model_version, code=c, created_at=now)
                for i, c in zip(chunk_ids, chunk_codes)
            ],
        )
        ids.extend(int(i) for i in chunk_ids)
    return ids


def _take_out_of_index(session: Session, image_id: int, new_status: str, reasons: Sequence[str]) -> bool:
    _lock_index_log(session)
    current = session.execute(select(DbImage.status, DbImage.reasons).where(DbImage.id == image_id)).one_or_none()
    if current is None:
        raise KeyError(f"no database image {image_id}")
    old_status, old_reasons = current
    if old_status == new_status or old_status == "removed":
        return False
    # Conditional on the status just read: of two racing callers only one changes it and logs.
    changed = session.execute(
        update(DbImage)
        .where(DbImage.id == image_id, DbImage.status == old_status)
        .values(status=new_status, reasons=[*(old_reasons or []), *reasons])
        .returning(DbImage.id)
    ).scalar_one_or_none()
    if changed is None:
        return False
    if old_status == "active":
        versions = session.scalars(
            select(ImageCode.model_version).where(ImageCode.image_id == image_id).order_by(ImageCode.model_version)
        ).all()
        now = utcnow()
        if versions:
            session.execute(
                insert(IndexLog),
                [dict(op="remove", image_id=image_id, model_version=v, code=None, created_at=now) for v in versions],
            )
    return True


def quarantine_image(session: Session, image_id: int, reasons: Sequence[str] = ()) -> bool:
    """Take an active image out of the index and mark it ``quarantined`` (kept for review).

    Writes an ``index_log`` ``remove`` row for every model version that has its code. Returns True
    if the status changed (False: already quarantined or removed). Raises KeyError if no such image.
    """
    return _take_out_of_index(session, image_id, "quarantined", reasons)


def remove_image(session: Session, image_id: int, reasons: Sequence[str] = ()) -> bool:
    """Mark an image ``removed``; if it was active, log ``remove`` for each of its model versions.

    Returns True if the status changed (False: removed already). Raises KeyError if no such image.
    """
    return _take_out_of_index(session, image_id, "removed", reasons)


def read_index_log(session: Session, after_seq: int, model_version: str, limit: int = 10_000) -> list[LogRow]:
    """Log rows of ``model_version`` with ``seq > after_seq``, oldest first, at most ``limit``.

    Each row is ``(seq, op, image_id, code)``; ``code`` is the packed code for ``add``, None for
    ``remove``. A replica applies them in order and keeps the last ``seq`` as its watermark.
    """
    rows = session.execute(
        select(IndexLog.seq, IndexLog.op, IndexLog.image_id, IndexLog.code)
        .where(IndexLog.model_version == model_version, IndexLog.seq > after_seq)
        .order_by(IndexLog.seq)
        .limit(limit)
    ).all()
    return [(int(s), op, int(i), None if c is None else bytes(c)) for s, op, i, c in rows]


def max_log_seq(session: Session, model_version: str | None = None) -> int:
    """The highest ``seq`` in ``index_log`` (of ``model_version`` if given); 0 when empty."""
    stmt = select(func.max(IndexLog.seq))
    if model_version is not None:
        stmt = stmt.where(IndexLog.model_version == model_version)
    return int(session.execute(stmt).scalar() or 0)


def get_image(session: Session, image_id: int) -> DbImage | None:
    """The ``db_images`` row of ``image_id``, or None."""
    return session.get(DbImage, image_id)


def active_image_codes(session: Session, model_version: str) -> list[tuple[int, bytes]]:
    """``(image_id, code)`` of every active image that has a code under ``model_version``, by id."""
    rows = session.execute(
        select(ImageCode.image_id, ImageCode.code)
        .join(DbImage, DbImage.id == ImageCode.image_id)
        .where(ImageCode.model_version == model_version, DbImage.status == "active")
        .order_by(ImageCode.image_id)
    ).all()
    return [(int(i), bytes(c)) for i, c in rows]


def images_without_code(session: Session, model_version: str, limit: int | None = None) -> list[tuple[int, str | None]]:
    """``(image_id, image_path)`` of active images with no code under ``model_version`` yet, by id.

    The publisher of a new model version re-encodes these (``add_image_codes_bulk``), and asks again
    after publishing to catch images inserted meanwhile under the previous version.
    """
    has_code = select(ImageCode.image_id).where(
        ImageCode.model_version == model_version, ImageCode.image_id == DbImage.id
    )
    stmt = (
        select(DbImage.id, DbImage.image_path)
        .where(DbImage.status == "active", ~has_code.exists())
        .order_by(DbImage.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(int(i), p) for i, p in session.execute(stmt).all()]


def add_image_codes_bulk(session: Session, model_version: str, codes: Iterable[tuple[int, bytes]]) -> int:
    """Store re-encoded codes ``(image_id, packed code)`` under ``model_version``; return how many were new.

    Codes already stored are kept (idempotent). Each new code of an *active* image also gets an
    ``add`` row in ``index_log``, so replicas of ``model_version`` can build their index from the log.
    """
    _lock_index_log(session)
    items = sorted({int(i): _as_code(c) for i, c in codes}.items())
    added = 0
    now = utcnow()
    for start in range(0, len(items), _CHUNK):
        chunk = items[start : start + _CHUNK]
        stmt = (
            _insert(session, ImageCode)
            .values([dict(image_id=i, model_version=model_version, code=c) for i, c in chunk])
            .on_conflict_do_nothing(index_elements=["image_id", "model_version"])
            .returning(ImageCode.image_id)
        )
        new_ids = set(session.scalars(stmt).all())
        added += len(new_ids)
        if not new_ids:
            continue
        active = set(
            session.scalars(select(DbImage.id).where(DbImage.id.in_(new_ids), DbImage.status == "active")).all()
        )
        rows = [
            dict(op="add", image_id=i, model_version=model_version, code=c, created_at=now)
            for i, c in chunk
            if i in active
        ]
        if rows:
            session.execute(insert(IndexLog), rows)
    return added


# --------------------------------------------------------------------------- model versions and calibrations


def get_model_version(session: Session, version: str) -> ModelVersion | None:
    """The ``model_versions`` row of ``version``, or None."""
    return session.scalars(select(ModelVersion).where(ModelVersion.version == version)).one_or_none()


def add_model_version(
    session: Session,
    version: str,
    checkpoint_path: str,
    checkpoint_sha256: str,
    backbone: str,
    bits: int,
    dataset: str,
    map_score: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register a trained model (inactive); idempotent on ``version`` (returns the existing row)."""
    stmt = (
        _insert(session, ModelVersion)
        .values(
            version=version,
            checkpoint_path=str(checkpoint_path),
            checkpoint_sha256=checkpoint_sha256,
            backbone=backbone,
            bits=int(bits),
            dataset=dataset,
            map_score=map_score,
            meta=dict(meta or {}),
            created_at=utcnow(),
            is_active=False,
        )
        .on_conflict_do_nothing(index_elements=["version"])
    )
    session.execute(stmt)
    row = get_model_version(session, version)
    assert row is not None
    return row


def publish_model_version(session: Session, version: str, **fields: Any) -> ModelVersion:
    """Make ``version`` the one active model version (registering it from ``fields`` if new).

    ``fields`` are ``add_model_version``'s arguments; needed only when the version is new. The
    previous active version is deactivated in the same transaction; ``published_at`` is set once.
    """
    if not fields and get_model_version(session, version) is None:
        raise KeyError(f"no model version {version!r}: pass its checkpoint fields to register it")
    _xact_lock(session, "umcd.model_versions")
    # Deactivate first: on SQLite this write takes the database lock before anything else is read.
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.is_active.is_(True), ModelVersion.version != version)
        .values(is_active=False)
    )
    if fields:
        add_model_version(session, version, **fields)
    row = session.scalars(
        select(ModelVersion).where(ModelVersion.version == version).execution_options(populate_existing=True)
    ).one()
    row.is_active = True
    if row.published_at is None:
        row.published_at = utcnow()
    session.flush()
    return row


def active_model_version(session: Session) -> ModelVersion | None:
    """The active model version, or None if none was published."""
    return session.scalars(select(ModelVersion).where(ModelVersion.is_active.is_(True))).one_or_none()


def add_calibration(
    session: Session,
    model_version: str,
    detector: str,
    transform: str,
    target_fpr: float,
    n_samples: int,
    thresholds: Mapping[str, float],
    path: str | None = None,
    meta: Mapping[str, Any] | None = None,
    activate: bool = True,
) -> Calibration:
    """Store the thresholds fitted for ``(model_version, detector)``; with ``activate`` they replace
    the active ones. ``thresholds`` maps criterion to value (``{"c1": bits, "c2": ..., "c3": bits}``).
    """
    if activate:
        _xact_lock(session, "umcd.calibrations")
        session.execute(
            update(Calibration)
            .where(
                Calibration.model_version == model_version,
                Calibration.detector == detector,
                Calibration.is_active.is_(True),
            )
            .values(is_active=False)
        )
    row = Calibration(
        model_version=model_version,
        detector=detector,
        transform=transform,
        target_fpr=float(target_fpr),
        n_samples=int(n_samples),
        thresholds={k: float(v) for k, v in thresholds.items()},
        path=None if path is None else str(path),
        meta=dict(meta or {}),
        created_at=utcnow(),
        is_active=activate,
    )
    session.add(row)
    session.flush()
    return row


def active_calibration(session: Session, model_version: str, detector: str | None = None) -> Calibration | None:
    """The active calibration of ``model_version`` (of ``detector`` if given; else the newest active)."""
    stmt = select(Calibration).where(Calibration.model_version == model_version, Calibration.is_active.is_(True))
    if detector is not None:
        stmt = stmt.where(Calibration.detector == detector)
    return session.scalars(stmt.order_by(Calibration.id.desc()).limit(1)).one_or_none()


def get_calibration(session: Session, calibration_id: int) -> Calibration | None:
    """The ``calibrations`` row of ``calibration_id``, or None."""
    return session.get(Calibration, calibration_id)


# --------------------------------------------------------------------------- attack sets, evaluation and training runs


def record_attack_set(
    session: Session,
    name: str,
    attack: str,
    params: Mapping[str, Any],
    path: str,
    n_images: int,
    success_rate: float | None = None,
    model_version: str | None = None,
) -> int:
    """Record a stored adversarial set; returns its id. ``success_rate`` is a fraction in [0, 1]."""
    row = AttackSet(
        name=name,
        attack=attack,
        params=dict(params),
        path=str(path),
        n_images=int(n_images),
        success_rate=success_rate,
        model_version=model_version,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row.id


def start_eval_run(session: Session, dataset: str, params: Mapping[str, Any] | None = None) -> int:
    """Record a benchmark run as ``running``; returns its id."""
    row = EvalRun(dataset=dataset, params=dict(params or {}), status="running", created_at=utcnow())
    session.add(row)
    session.flush()
    return row.id


def finish_eval_run(
    session: Session,
    run_id: int,
    results: Mapping[str, Any] | None = None,
    report_dir: str | None = None,
    status: str = "done",
) -> None:
    """Mark benchmark run ``run_id`` finished (``done`` | ``failed``) with its results and report folder."""
    row = session.get(EvalRun, run_id)
    if row is None:
        raise KeyError(f"no eval run {run_id}")
    row.status = status
    row.results = None if results is None else dict(results)
    row.report_dir = None if report_dir is None else str(report_dir)
    row.finished_at = utcnow()
    session.flush()


def start_train_run(session: Session, dataset: str, params: Mapping[str, Any] | None = None) -> int:
    """Record a training run as ``running``; returns its id."""
    row = TrainRun(dataset=dataset, params=dict(params or {}), status="running", created_at=utcnow())
    session.add(row)
    session.flush()
    return row.id


def finish_train_run(
    session: Session,
    run_id: int,
    model_version: str | None = None,
    results: Mapping[str, Any] | None = None,
    status: str = "done",
) -> None:
    """Mark training run ``run_id`` finished (``done`` | ``failed``) with the model version it made."""
    row = session.get(TrainRun, run_id)
    if row is None:
        raise KeyError(f"no train run {run_id}")
    row.status = status
    row.model_version = model_version
    row.results = None if results is None else dict(results)
    row.finished_at = utcnow()
    session.flush()


# --------------------------------------------------------------------------- audit queries


def last_verdicts(session: Session, n: int = 20, kind: str | None = None) -> list[dict[str, Any]]:
    """The ``n`` newest verdicts (of ``kind`` if given), newest first, as dicts of their columns."""
    stmt = select(Verdict)
    if kind is not None:
        stmt = stmt.where(Verdict.kind == kind)
    rows = session.scalars(stmt.order_by(Verdict.created_at.desc(), Verdict.id.desc()).limit(n)).all()
    return [row_dict(r) for r in rows]


def verdict_counts(session: Session, kind: str | None = None) -> dict[str, int]:
    """How many verdicts of each kind of verdict (``benign``, ``adversarial``, ``invalid_input``)."""
    stmt = select(Verdict.verdict, func.count()).group_by(Verdict.verdict)
    if kind is not None:
        stmt = stmt.where(Verdict.kind == kind)
    counts = dict.fromkeys(VERDICTS, 0)
    counts.update({v: int(c) for v, c in session.execute(stmt).all()})
    return counts


def rejections_by_criterion(session: Session, kind: str | None = None) -> dict[str, int]:
    """Rejections broken down: ``adversarial`` and ``invalid_input`` totals, and for c1, c2, c3 the
    number of adversarial verdicts in which that criterion fired (one verdict may count for several);
    ``other``: adversarial verdicts in which a criterion of an extension detector fired (``trust@in``, ...).
    """
    fired_text = cast(Verdict.fired, String)
    columns = [func.count().label("adversarial")]
    for criterion in CRITERIA:
        columns.append(
            func.coalesce(
                func.sum(case((fired_text.like(f'%"{criterion}"%'), literal(1)), else_=literal(0))), 0
            ).label(criterion)
        )
    rest = fired_text  # the fired list with the paper's criteria taken out: another quoted name is left?
    for criterion in CRITERIA:
        rest = func.replace(rest, f'"{criterion}"', "")
    columns.append(func.coalesce(func.sum(case((rest.like('%"%'), literal(1)), else_=literal(0))), 0).label("other"))
    stmt = select(*columns).where(Verdict.verdict == "adversarial")
    invalid = select(func.count()).where(Verdict.verdict == "invalid_input")
    if kind is not None:
        stmt = stmt.where(Verdict.kind == kind)
        invalid = invalid.where(Verdict.kind == kind)
    row = session.execute(stmt).one()
    out = {c: int(getattr(row, c)) for c in CRITERIA}
    out["other"] = int(row.other)
    out["adversarial"] = int(row.adversarial)
    out["invalid_input"] = int(session.execute(invalid).scalar_one())
    return out


def request_record(session: Session, request_id: str) -> dict[str, Any] | None:
    """Everything stored about one request: ``{"request", "verdict", "image"}`` (each a dict or None).

    Returns None when neither a request nor a verdict row exists.
    """
    row = session.execute(
        select(Request, Verdict).outerjoin(Verdict, Verdict.request_id == Request.request_id)
        .where(Request.request_id == request_id)
    ).one_or_none()
    request, verdict = (row[0], row[1]) if row is not None else (None, get_verdict(session, request_id))
    if request is None and verdict is None:
        return None
    image = session.scalars(select(DbImage).where(DbImage.request_id == request_id)).one_or_none()
    return {"request": row_dict(request), "verdict": row_dict(verdict), "image": row_dict(image)}


def count_verdicts_per_request(session: Session) -> dict[str, int]:
    """Number of verdict rows for every recorded request (0 if none yet), plus any verdict whose
    request was never recorded. A healthy store has exactly 1 for every finished request."""
    stmt = (
        select(Request.request_id, func.count(Verdict.id))
        .outerjoin(Verdict, Verdict.request_id == Request.request_id)
        .group_by(Request.request_id)
    )
    counts = {rid: int(n) for rid, n in session.execute(stmt).all()}
    orphans = (
        select(Verdict.request_id, func.count())
        .where(~select(Request.request_id).where(Request.request_id == Verdict.request_id).exists())
        .group_by(Verdict.request_id)
    )
    counts.update({rid: int(n) for rid, n in session.execute(orphans).all()})
    return counts


def duplicates(session: Session) -> dict[str, list[tuple]]:
    """What should never repeat, and does: ``verdicts`` and ``db_images`` per request id, and
    ``index_log`` ``add`` rows per ``(image_id, model_version)``. Empty lists when healthy."""
    verdicts = session.execute(
        select(Verdict.request_id, func.count()).group_by(Verdict.request_id).having(func.count() > 1)
    ).all()
    images = session.execute(
        select(DbImage.request_id, func.count())
        .where(DbImage.request_id.is_not(None))
        .group_by(DbImage.request_id)
        .having(func.count() > 1)
    ).all()
    adds = session.execute(
        select(IndexLog.image_id, IndexLog.model_version, func.count())
        .where(IndexLog.op == "add")
        .group_by(IndexLog.image_id, IndexLog.model_version)
        .having(func.count() > 1)
    ).all()
    return {
        "verdicts": [tuple(r) for r in verdicts],
        "db_images": [tuple(r) for r in images],
        "index_log": [tuple(r) for r in adds],
    }


def image_counts(session: Session) -> dict[str, int]:
    """How many database images have each status (``active``, ``quarantined``, ``removed``)."""
    counts = dict.fromkeys(IMAGE_STATUSES, 0)
    counts.update(
        {s: int(n) for s, n in session.execute(select(DbImage.status, func.count()).group_by(DbImage.status)).all()}
    )
    return counts
