"""Verdict rows keep the scores of criteria beyond C1, C2 and C3 (the extension detectors: trust@in, ...).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("verdicts", sa.Column("extra_scores", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("extra_scores")
