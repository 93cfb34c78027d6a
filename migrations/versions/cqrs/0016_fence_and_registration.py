"""A view's projection removed in a transaction that writes events leaves that
transaction in the fence; prune and a reader created from the oldest history are kept
apart; register_projection checks what it stores; errors show a value on one line.

Revision ID: cqrs_0016
Revises: cqrs_0015
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0016"
down_revision = "cqrs_0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0016")
