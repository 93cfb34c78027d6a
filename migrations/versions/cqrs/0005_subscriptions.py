"""Events for other services: subscriptions that any SQL client polls and acknowledges,
the relay's resume point, and the group role cqrs_consumer.

Revision ID: cqrs_0005
Revises: cqrs_0004
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0005"
down_revision = "cqrs_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0005")
