"""SQLAlchemy 2.0 models of the audit store; the same schema runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.contract import REQUEST_ID_LEN, TEXT_LEN

# Named constraints, so that migrations can refer to them on both dialects.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a 64-bit ``BIGINT``.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

VERSION_LEN = 64
KINDS = ("query", "insert")
VERDICTS = ("benign", "adversarial", "invalid_input")
IMAGE_STATUSES = ("active", "quarantined", "removed")
LOG_OPS = ("add", "remove")
CRITERIA = ("c1", "c2", "c3")


class UTCDateTime(TypeDecorator):
    """A ``DateTime(timezone=True)`` that stores UTC and always reads back timezone-aware datetimes
    (SQLite keeps no zone: naive values are taken as UTC on the way in and out)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        list[str]: JSON,
        datetime: UTCDateTime(),
    }


class ModelVersion(Base):
    """A trained hashing model: its checkpoint and how well it retrieves; at most one is active."""

    __tablename__ = "model_versions"
    __table_args__ = (
        Index(
            "uq_model_versions_one_active",
            "is_active",
            unique=True,
            sqlite_where=text("is_active = 1"),
            postgresql_where=text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(VERSION_LEN), unique=True)  # first 12 hex of sha256
    checkpoint_path: Mapped[str] = mapped_column(Text)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(64))
    bits: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str] = mapped_column(String(128))
    map_score: Mapped[float | None] = mapped_column(Float)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)


class Calibration(Base):
    """Thresholds of one detector for one model version, fitted on benign samples at a target FPR."""

    __tablename__ = "calibrations"
    __table_args__ = (
        Index(
            "uq_calibrations_one_active",
            "model_version",
            "detector",
            unique=True,
            sqlite_where=text("is_active = 1"),
            postgresql_where=text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[str] = mapped_column(String(VERSION_LEN), index=True)  # model_versions.version
    detector: Mapped[str] = mapped_column(String(64))
    transform: Mapped[str] = mapped_column(String(64))
    target_fpr: Mapped[float] = mapped_column(Float)
    n_samples: Mapped[int] = mapped_column(Integer)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"c1": float, "c2": float, "c3": float}
    path: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)


class Request(Base):
    """One screening request as a producer submitted it (query or insertion)."""

    __tablename__ = "requests"
    __table_args__ = (CheckConstraint(_in("kind", KINDS), name="kind"),)

    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_LEN), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(TEXT_LEN))
    source: Mapped[str | None] = mapped_column(String(TEXT_LEN))
    label: Mapped[int | None] = mapped_column(Integer)  # 32-bit: db.contract.LABEL_MIN..LABEL_MAX
    image_bytes: Mapped[int | None] = mapped_column(Integer)  # size of the encoded image, bytes
    image_ref: Mapped[str | None] = mapped_column(String(16))  # db.contract.IMAGE_REF_KINDS
    submitted_at: Mapped[datetime | None]  # producer clock
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # worker clock


class Verdict(Base):
    """The one verdict of one request: scores, thresholds, criteria fired, who decided, how fast."""

    __tablename__ = "verdicts"
    __table_args__ = (
        CheckConstraint(_in("kind", KINDS), name="kind"),
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(REQUEST_ID_LEN), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str] = mapped_column(String(16), index=True)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    c1: Mapped[float | None] = mapped_column(Float)  # mean Hamming distance to the top-k, bits
    c2: Mapped[float | None] = mapped_column(Float)  # quantization loss ||h - f||_1
    c3: Mapped[float | None] = mapped_column(Float)  # continuous Hamming disagreement with t(x), bits
    combined: Mapped[float | None] = mapped_column(Float)
    #: scores of the detector's criteria beyond C1, C2 and C3 (extension detectors: {"trust@in": ...}); None
    extra_scores: Mapped[dict[str, float] | None] = mapped_column(JSON)
    thresholds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fired: Mapped[list[str]] = mapped_column(JSON, default=list)  # subset of ["c1", "c2", "c3"]
    detector: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    calibration_id: Mapped[int | None] = mapped_column(Integer)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    latency_queue_ms: Mapped[float | None] = mapped_column(Float)
    latency_model_ms: Mapped[float | None] = mapped_column(Float)
    latency_search_ms: Mapped[float | None] = mapped_column(Float)
    latency_total_ms: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(256))
    image_id: Mapped[int | None] = mapped_column(BigInteger)  # db_images.id of an accepted insertion
    topk: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"ids": [int], "distances": [int]}
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DbImage(Base):
    """An image of the searchable database; only ``active`` ones are in the search index."""

    __tablename__ = "db_images"
    __table_args__ = (CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(String(REQUEST_ID_LEN), unique=True)
    source: Mapped[str | None] = mapped_column(String(TEXT_LEN))
    label: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    image_path: Mapped[str | None] = mapped_column(Text)  # stored bytes, for re-encoding on publish
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ImageCode(Base):
    """The binary code of one database image under one model version (packed bits, K/8 bytes)."""

    __tablename__ = "image_codes"

    image_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("db_images.id", ondelete="CASCADE"), primary_key=True
    )
    model_version: Mapped[str] = mapped_column(String(VERSION_LEN), primary_key=True, index=True)
    code: Mapped[bytes] = mapped_column(LargeBinary)


class IndexLog(Base):
    """Append-only log of index changes; search replicas apply rows with ``seq`` above their watermark."""

    __tablename__ = "index_log"
    __table_args__ = (
        CheckConstraint(_in("op", LOG_OPS), name="op"),
        Index("ix_index_log_model_version_seq", "model_version", "seq"),
        {"sqlite_autoincrement": True},  # never reuse a seq
    )

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(8))
    image_id: Mapped[int] = mapped_column(BigInteger)
    model_version: Mapped[str] = mapped_column(String(VERSION_LEN))
    code: Mapped[bytes | None] = mapped_column(LargeBinary)  # packed bits for "add", None for "remove"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AttackSet(Base):
    """A stored set of adversarial images made by one attack against one model version."""

    __tablename__ = "attack_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    attack: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer)
    success_rate: Mapped[float | None] = mapped_column(Float)  # fraction in [0, 1]
    model_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvalRun(Base):
    """One run of the benchmark: parameters, status (running | done | failed), results, report folder."""

    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running")
    report_dir: Mapped[str | None] = mapped_column(Text)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class TrainRun(Base):
    """One CSQ training run: parameters, status, and the model version it produced."""

    __tablename__ = "train_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running")
    model_version: Mapped[str | None] = mapped_column(String(VERSION_LEN))
    results: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
