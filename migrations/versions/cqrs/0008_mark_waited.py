"""A shared round reports how long it waited for the daemon's mark, which the apply budget
does not charge; a batch is looked up again under the projection's lock only when its
checkpoint moved.

Revision ID: cqrs_0008
Revises: cqrs_0007
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0008"
down_revision = "cqrs_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0008")
