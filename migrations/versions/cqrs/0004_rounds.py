"""A daemon's round of small batches costs less: helper functions planned once per
session, and one statement and one commit for several sql projections' batches.

Revision ID: cqrs_0004
Revises: cqrs_0003
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0004"
down_revision = "cqrs_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0004")
