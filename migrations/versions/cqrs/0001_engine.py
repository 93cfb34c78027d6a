"""The cqrs engine: schema cqrs, its roles and their grants (the baseline).

Revision ID: cqrs_0001
Revises:
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0001"
down_revision = None
branch_labels = ("cqrs",)
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    # The baseline's downgrade removes everything the engine ever created; later revisions
    # are forward-only (migrations/README.md).
    core.uninstall(op)
