"""A rebuild's final transaction catches the shadow up with a daemon's batch that
committed while it waited for the projection's lock, instead of refusing the swap.

Revision ID: cqrs_0010
Revises: cqrs_0009
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0010"
down_revision = "cqrs_0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0010")
