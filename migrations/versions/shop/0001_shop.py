"""The example domain: the shop's write model and commands (schema shop), read model
(shop_read) and projections (shop_proj), on the cqrs engine (the baseline).

Revision ID: shop_0001
Revises:
Depends on: cqrs_0001
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "shop_0001"
down_revision = None
branch_labels = ("shop",)
depends_on = "cqrs_0001"

# Everything the example created: its schemas, its projections' rows and rebuild shadows,
# and the capture functions cqrs.capture_changes generated for its tables.
UNINSTALL = """
DO $$
DECLARE
    f regprocedure;
    s name;
BEGIN
    FOR s IN SELECT 'cqrs_rebuild_' || p.name FROM cqrs.projections p
              WHERE p.name IN ('order_summary', 'customer_stats', 'product_sales') LOOP
        EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s);
    END LOOP;
    DELETE FROM cqrs.projections p WHERE p.name IN ('order_summary', 'customer_stats', 'product_sales');
    DROP SCHEMA IF EXISTS shop_proj, shop_read, shop CASCADE;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'cqrs'::regnamespace AND p.proname LIKE '\\_capture\\_shop\\_%' LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$$;
"""


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.run_sql(op, UNINSTALL)
