"""A projection's failure stops only that projection: halt or park, parked events, retry
and skip.

Revision ID: cqrs_0002
Revises: cqrs_0001
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0002"
down_revision = "cqrs_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0002")
