"""Faster event capture and catch-up, hardened commands, read routing support.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg.sqlsource import run_frozen

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# What this revision runs, in order: its own steps (migrations/versions/0002/) and the
# files of sql/ it (re)creates. Frozen into FROZEN by:
#   python -m cqrs_pg.sqlsource refreeze migrations/versions/0002_engine_and_commands.py
SOURCES = [
    "migrations/versions/0002/before.sql",
    "sql/cqrs/indexes/commands_created_at.sql",
    "sql/cqrs/functions/_fail.sql",
    "sql/cqrs/functions/_require_text.sql",
    "sql/cqrs/functions/_begin_command.sql",
    "sql/cqrs/functions/_finish_command.sql",
    "sql/cqrs/functions/_ring_doorbell.sql",
    "sql/cqrs/functions/capture_changes.sql",
    "sql/cqrs/functions/batch.sql",
    "sql/cqrs/functions/batch_unordered.sql",
    "sql/cqrs/functions/_next_batch.sql",
    "sql/cqrs/functions/run_projection.sql",
    "sql/cqrs/functions/rebuild_begin.sql",
    "sql/cqrs/functions/rebuild_step.sql",
    "sql/cqrs/functions/rebuild_claim.sql",
    "sql/cqrs/functions/rebuild_events.sql",
    "sql/cqrs/functions/rebuild_complete.sql",
    "sql/cqrs/functions/rebuild_finish.sql",
    "sql/cqrs/functions/prune_receipts.sql",
    "sql/shop/functions/_parse_order_lines.sql",
    "sql/shop/functions/_close_order.sql",
    "sql/shop/functions/rename_customer.sql",
    "sql/shop/functions/place_order.sql",
    "sql/shop_read/views/product_sales.sql",
    "sql/shop_proj/functions/apply_order_summary.sql",
    "sql/shop_proj/functions/apply_customer_stats.sql",
    "sql/cqrs/privileges.sql",
    "sql/privileges.sql",
    "migrations/versions/0002/after.sql",
    "migrations/versions/0002/capture.sql",
]
FROZEN = Path(__file__).with_name("0002_engine_and_commands.sql")
FROZEN_SHA256 = "64d3c40941ea78398097b8f19d388eee649677d1f953f2085a81078863bdd3a0"


# Back to 0001: undo this revision's own steps, then restore each changed file of sql/
# as 0001 froze it ("0001_initial.sql:sql/...").
DOWNGRADE_SOURCES = [
    "migrations/versions/0002/downgrade.sql",
    "0001_initial.sql:sql/cqrs/functions/tg_capture.sql",
    "0001_initial.sql:sql/cqrs/functions/capture_changes.sql",
    "migrations/versions/0002/downgrade_capture.sql",
    "0001_initial.sql:sql/cqrs/functions/batch.sql",
    "0001_initial.sql:sql/cqrs/functions/_next_batch.sql",
    "0001_initial.sql:sql/shop_proj/functions/apply_order_summary.sql",
    "0001_initial.sql:sql/shop_proj/functions/apply_customer_stats.sql",
    "0001_initial.sql:sql/cqrs/functions/run_projection.sql",
    "0001_initial.sql:sql/cqrs/functions/rebuild_begin.sql",
    "0001_initial.sql:sql/cqrs/functions/rebuild_step.sql",
    "0001_initial.sql:sql/cqrs/functions/rebuild_finish.sql",
    "0001_initial.sql:sql/cqrs/functions/_fail.sql",
    "0001_initial.sql:sql/cqrs/functions/_require_text.sql",
    "0001_initial.sql:sql/cqrs/functions/_begin_command.sql",
    "0001_initial.sql:sql/cqrs/functions/_finish_command.sql",
    "0001_initial.sql:sql/shop/functions/_parse_order_lines.sql",
    "0001_initial.sql:sql/shop/functions/_close_order.sql",
    "0001_initial.sql:sql/shop/functions/rename_customer.sql",
    "0001_initial.sql:sql/shop/functions/place_order.sql",
    "0001_initial.sql:sql/shop_read/views/product_sales.sql",
    "migrations/versions/0002/downgrade_after.sql",
]
FROZEN_DOWNGRADE = Path(__file__).with_name("0002_engine_and_commands.downgrade.sql")
FROZEN_DOWNGRADE_SHA256 = "af2ab1031e02cac55e9956761018ac6a917804134f59fa1c1e2208ceb7945880"


def upgrade() -> None:
    run_frozen(op, FROZEN, FROZEN_SHA256)


def downgrade() -> None:
    run_frozen(op, FROZEN_DOWNGRADE, FROZEN_DOWNGRADE_SHA256)
