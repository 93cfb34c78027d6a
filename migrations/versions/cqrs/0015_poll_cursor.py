"""A poll that waited for the subscription's row never moves its cursor back below an
acknowledgement committed meanwhile.

Revision ID: cqrs_0015
Revises: cqrs_0014
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0015"
down_revision = "cqrs_0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0015")
