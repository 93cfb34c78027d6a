"""A round's wait for its mark, and a lingering daemon's look, wait on the command at the
fence, whose commit ends the wait, instead of spinning and sleeping.

Revision ID: cqrs_0014
Revises: cqrs_0013
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0014"
down_revision = "cqrs_0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0014")
