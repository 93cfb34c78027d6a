"""The outbox partitioned by position, history leaving by whole partitions (cqrs.prune);
read models rebuilt from the write model's state and verified against it.

Revision ID: cqrs_0003
Revises: cqrs_0002
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0003"
down_revision = "cqrs_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0003")
