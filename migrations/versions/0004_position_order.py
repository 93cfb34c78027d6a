"""Readers read the outbox in position order, each aggregate's version order.

Every projection, rebuild and python handler gets the events of one aggregate in the order
they were written, also when a lower transaction id wrote the later version (row locks
taken under contention), with no lock on writers: readers read up to the final position
(cqrs._read_limit) instead of below the xmin fence in (tx_id, position) order. Existing
checkpoints are converted without applying any event twice or skipping one; the
(tx_id, position) index goes. See sql/cqrs/DESIGN.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg.sqlsource import run_frozen

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# What this revision runs, in order. Frozen into FROZEN by:
#   python -m cqrs_pg.sqlsource refreeze migrations/versions/0004_position_order.py
SOURCES = [
    "migrations/versions/0004/before.sql",
    "sql/cqrs/functions/_fence.sql",
    "sql/cqrs/functions/_xid_assigned.sql",
    "sql/cqrs/functions/_read_limit.sql",
    "sql/cqrs/functions/_mark_replaceable.sql",
    "sql/cqrs/functions/_needs_mark.sql",
    "sql/cqrs/functions/_horizon.sql",
    "sql/cqrs/functions/_next_batch.sql",
    "sql/cqrs/functions/batch.sql",
    "sql/cqrs/functions/batch_unordered.sql",
    "sql/cqrs/functions/_apply_batch.sql",
    "sql/cqrs/functions/_advance_checkpoint.sql",
    "sql/cqrs/functions/register_projection.sql",
    "sql/cqrs/functions/run_projection.sql",
    "sql/cqrs/functions/claim_batch.sql",
    "sql/cqrs/functions/batch_events.sql",
    "sql/cqrs/functions/complete_batch.sql",
    "sql/cqrs/functions/rebuild_step.sql",
    "sql/cqrs/functions/rebuild_claim.sql",
    "sql/cqrs/functions/rebuild_events.sql",
    "sql/cqrs/functions/rebuild_complete.sql",
    "sql/cqrs/functions/rebuild_finish.sql",
    "sql/cqrs/functions/work_pending.sql",
    "sql/cqrs/functions/projection_status.sql",
    "sql/cqrs/functions/fence_status.sql",
    "sql/cqrs/functions/take_mark.sql",
    "sql/cqrs/functions/mark_usable.sql",
    "migrations/versions/0004/after_core.sql",
    "sql/cqrs/privileges.sql",
    "migrations/versions/0004/before_shop.sql",
    "sql/shop_proj/functions/apply_order_summary.sql",
    "sql/shop_proj/functions/apply_customer_stats.sql",
    "sql/privileges.sql",
    "migrations/versions/0004/after.sql",
]
# The cqrs core's version "0004" (cqrs_pg.core): the steps of SOURCES that are core,
# frozen by `python -m cqrs_pg.core freeze`.
CORE_SOURCES = [
    s for s in SOURCES
    if s.startswith("sql/cqrs/") or s.endswith(("0004/before.sql", "0004/after_core.sql"))
]
FROZEN = Path(__file__).with_name("0004_position_order.sql")
FROZEN_SHA256 = "cd823b33e5723c948d5a9cf255490ddfcb89bc766cabbf6b3d65f52944a6a332"

# Back to 0003: the tables in their earlier shape, each changed file of sql/ as the
# revision before froze it, then this revision's own objects go.
DOWNGRADE_SOURCES = [
    "migrations/versions/0004/downgrade_before.sql",
    "0001_initial.sql:sql/cqrs/functions/_projection.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/_fence.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/batch.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/batch_unordered.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/_next_batch.sql",
    "0001_initial.sql:sql/cqrs/functions/_apply_batch.sql",
    "0001_initial.sql:sql/cqrs/functions/_advance_checkpoint.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/register_projection.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/run_projection.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/claim_batch.sql",
    "0001_initial.sql:sql/cqrs/functions/batch_events.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/complete_batch.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_step.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_claim.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_events.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_complete.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/rebuild_finish.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/work_pending.sql",
    "0001_initial.sql:sql/cqrs/functions/projection_status.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/functions/fence_status.sql",
    "0003_refresh_outside_fence.sql:sql/cqrs/privileges.sql",
    "0002_engine_and_commands.sql:sql/shop_proj/functions/apply_order_summary.sql",
    "0003_refresh_outside_fence.sql:sql/shop_proj/functions/apply_customer_stats.sql",
    "0002_engine_and_commands.sql:sql/privileges.sql",
    "migrations/versions/0004/downgrade_after.sql",
]
FROZEN_DOWNGRADE = Path(__file__).with_name("0004_position_order.downgrade.sql")
FROZEN_DOWNGRADE_SHA256 = "9c2d731a3274a0fe38b58c2fd67822bea171338c88d4d80ddb158fc7e93dcf83"


def upgrade() -> None:
    run_frozen(op, FROZEN, FROZEN_SHA256)


def downgrade() -> None:
    run_frozen(op, FROZEN_DOWNGRADE, FROZEN_DOWNGRADE_SHA256)
