"""Order lines bounded as given: a quantity written longer than 20 characters is refused,
so a receipt never keeps more than the documented bound.

Revision ID: shop_0002
Revises: shop_0001
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "shop_0002"
down_revision = "shop_0001"
branch_labels = None
depends_on = "cqrs_0002"


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("shop_0002")
