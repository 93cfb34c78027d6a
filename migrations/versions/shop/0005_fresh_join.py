"""customer_stats finds the customers new in a batch by a join, not a subquery per
customer: planned for an empty table, that scanned the table being filled once per
customer.

Revision ID: shop_0005
Revises: shop_0004
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "shop_0005"
down_revision = "shop_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("shop_0005")
