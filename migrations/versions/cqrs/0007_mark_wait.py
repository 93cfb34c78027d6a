"""A round starts as soon as the command it waits for commits: the wait for a daemon's mark
spins briefly before it sleeps, and a shared round waits for the mark itself.

Revision ID: cqrs_0007
Revises: cqrs_0006
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0007"
down_revision = "cqrs_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0007")
