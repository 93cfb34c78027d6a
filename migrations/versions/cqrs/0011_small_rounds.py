"""A small round's fixed cost: fewer of the engine's own statements and PL/pgSQL layers
around each batch (the small batch applied without a further call, the projection's row
locked and read at once, the next batch found in one index walk).

Revision ID: cqrs_0011
Revises: cqrs_0010
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0011"
down_revision = "cqrs_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0011")
