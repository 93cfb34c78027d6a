"""A lingering daemon's look waits on the server for the outbox's sequence to move, where
it looked from the daemon again and again.

Revision ID: cqrs_0012
Revises: cqrs_0011
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0012"
down_revision = "cqrs_0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0012")
