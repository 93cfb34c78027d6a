"""The statements that read every row of the engine's busy tables at every round or read
have a way through the primary key, and the doorbell asks a partial index of the sleeping
daemons.

Revision ID: cqrs_0009
Revises: cqrs_0008
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0009"
down_revision = "cqrs_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0009")
