"""Just after a round, a lingering daemon's look glances at the outbox's sequence while it
has not moved, and looks in full, taking the round's mark, once it has.

Revision ID: cqrs_0013
Revises: cqrs_0012
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0013"
down_revision = "cqrs_0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0013")
