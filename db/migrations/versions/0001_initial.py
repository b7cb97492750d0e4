"""The initial audit store: model versions, calibrations, requests, verdicts, database images, index log.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT (bigserial).
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("checkpoint_path", sa.Text(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("map_score", sa.Float(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("published_at", TZ, nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["is_active"],
        unique=True,
        sqlite_where=sa.text("is_active = 1"),
        postgresql_where=sa.text("is_active"),
    )

    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("detector", sa.String(64), nullable=False),
        sa.Column("transform", sa.String(64), nullable=False),
        sa.Column("target_fpr", sa.Float(), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index(op.f("ix_calibrations_model_version"), "calibrations", ["model_version"])
    op.create_index(
        "uq_calibrations_one_active",
        "calibrations",
        ["model_version", "detector"],
        unique=True,
        sqlite_where=sa.text("is_active = 1"),
        postgresql_where=sa.text("is_active"),
    )

    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("client", sa.String(256), nullable=True),
        sa.Column("source", sa.String(256), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("image_bytes", sa.Integer(), nullable=True),
        sa.Column("image_ref", sa.String(16), nullable=True),
        sa.Column("submitted_at", TZ, nullable=True),
        sa.Column("received_at", TZ, nullable=False),
        sa.CheckConstraint("kind IN ('query', 'insert')", name=op.f("ck_requests_kind")),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_requests")),
    )
    op.create_index(op.f("ix_requests_received_at"), "requests", ["received_at"])

    op.create_table(
        "verdicts",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("c1", sa.Float(), nullable=True),
        sa.Column("c2", sa.Float(), nullable=True),
        sa.Column("c3", sa.Float(), nullable=True),
        sa.Column("combined", sa.Float(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("fired", sa.JSON(), nullable=False),
        sa.Column("detector", sa.String(64), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("calibration_id", sa.Integer(), nullable=True),
        sa.Column("batch_size", sa.Integer(), nullable=True),
        sa.Column("latency_queue_ms", sa.Float(), nullable=True),
        sa.Column("latency_model_ms", sa.Float(), nullable=True),
        sa.Column("latency_search_ms", sa.Float(), nullable=True),
        sa.Column("latency_total_ms", sa.Float(), nullable=True),
        sa.Column("worker", sa.String(256), nullable=True),
        sa.Column("image_id", sa.BigInteger(), nullable=True),
        sa.Column("topk", sa.JSON(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("kind IN ('query', 'insert')", name=op.f("ck_verdicts_kind")),
        sa.CheckConstraint(
            "verdict IN ('benign', 'adversarial', 'invalid_input')", name=op.f("ck_verdicts_verdict")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint("request_id", name=op.f("uq_verdicts_request_id")),
    )
    op.create_index(op.f("ix_verdicts_created_at"), "verdicts", ["created_at"])
    op.create_index(op.f("ix_verdicts_verdict"), "verdicts", ["verdict"])

    op.create_table(
        "db_images",
        sa.Column("id", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("source", sa.String(256), nullable=True),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint(
            "status IN ('active', 'quarantined', 'removed')", name=op.f("ck_db_images_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_db_images")),
        sa.UniqueConstraint("request_id", name=op.f("uq_db_images_request_id")),
    )
    op.create_index(op.f("ix_db_images_status"), "db_images", ["status"])

    op.create_table(
        "image_codes",
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("code", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["db_images.id"],
            name=op.f("fk_image_codes_image_id_db_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("image_id", "model_version", name=op.f("pk_image_codes")),
    )
    op.create_index(op.f("ix_image_codes_model_version"), "image_codes", ["model_version"])

    op.create_table(
        "index_log",
        sa.Column("seq", BIGINT_PK, autoincrement=True, nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("code", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.CheckConstraint("op IN ('add', 'remove')", name=op.f("ck_index_log_op")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_index_log")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_index_log_model_version_seq", "index_log", ["model_version", "seq"])

    op.create_table(
        "attack_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("attack", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("success_rate", sa.Float(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attack_sets")),
    )

    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("report_dir", sa.Text(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_runs")),
    )

    op.create_table(
        "train_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(128), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("results", sa.JSON(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_train_runs")),
    )


def downgrade() -> None:
    for table in (
        "train_runs",
        "eval_runs",
        "attack_sets",
        "index_log",
        "image_codes",
        "db_images",
        "verdicts",
        "requests",
        "calibrations",
        "model_versions",
    ):
        op.drop_table(table)
