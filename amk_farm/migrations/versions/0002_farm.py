"""The farm's job state: job keys and owner leases, stage nodes and times, one row per
obligation of a job with its verdict.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("owner", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("heartbeat", WHEN, nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("summary", sa.JSON(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_jobs_key"), ["key"])

    with op.batch_alter_table("stages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("node", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("seconds", sa.Float(), nullable=True))
        batch_op.create_unique_constraint("uq_stages_job_name", ["job_id", "name"])

    with op.batch_alter_table("obligations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ordinal", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("check", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("subject", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("obligation_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("counterexample", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("node", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("finished", WHEN, nullable=True))
        batch_op.create_unique_constraint("uq_obligations_job_ordinal", ["job_id", "ordinal"])


def downgrade() -> None:
    with op.batch_alter_table("obligations", schema=None) as batch_op:
        batch_op.drop_constraint("uq_obligations_job_ordinal", type_="unique")
        for name in (
            "finished",
            "node",
            "counterexample",
            "reason",
            "obligation_digest",
            "subject",
            "check",
            "ordinal",
        ):
            batch_op.drop_column(name)

    with op.batch_alter_table("stages", schema=None) as batch_op:
        batch_op.drop_constraint("uq_stages_job_name", type_="unique")
        batch_op.drop_column("seconds")
        batch_op.drop_column("node")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_jobs_key"), type_="unique")
        for name in ("summary", "error", "heartbeat", "owner", "key"):
            batch_op.drop_column(name)
