"""The shop's apply functions leave their plans to the engine: generic plans for small
batches, plans made for their bounds for large ones.

Revision ID: shop_0004
Revises: shop_0003
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "shop_0004"
down_revision = "shop_0003"
branch_labels = None
depends_on = "cqrs_0006"


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("shop_0004")
