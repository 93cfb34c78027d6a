"""The shop's projections declare their read models' definitions: rebuilt from state,
verified against it.

Revision ID: shop_0003
Revises: shop_0002
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "shop_0003"
down_revision = "shop_0002"
branch_labels = None
depends_on = "cqrs_0003"


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("shop_0003")
