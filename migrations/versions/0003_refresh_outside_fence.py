"""A materialized view's refresh no longer holds the other projections back; customer_stats
applies deltas.

cqrs._fence leaves the refresh's transaction out of every projection's fence (it writes no
events, which the outbox capture now enforces); see sql/cqrs/DESIGN.md. customer_stats adds
what a batch changes to its customers' counts instead of recounting all their orders.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg.sqlsource import run_frozen

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# What this revision runs, in order. Frozen into FROZEN by:
#   python -m cqrs_pg.sqlsource refreeze migrations/versions/0003_refresh_outside_fence.py
SOURCES = [
    "sql/cqrs/tables/refreshing.sql",
    "sql/cqrs/functions/_left_out_of_fence.sql",
    "sql/cqrs/functions/_fence.sql",
    "sql/cqrs/functions/_exempt_from_fence.sql",
    "sql/cqrs/functions/_ring_doorbell.sql",
    "sql/cqrs/functions/register_projection.sql",
    "migrations/versions/0003/after_tables.sql",
    "sql/cqrs/functions/run_projection.sql",
    "sql/cqrs/functions/claim_batch.sql",
    "sql/cqrs/functions/complete_batch.sql",
    "sql/cqrs/functions/rebuild_begin.sql",
    "sql/cqrs/functions/rebuild_step.sql",
    "sql/cqrs/functions/rebuild_claim.sql",
    "sql/cqrs/functions/rebuild_complete.sql",
    "sql/cqrs/functions/rebuild_finish.sql",
    "sql/cqrs/functions/fence_status.sql",
    "sql/cqrs/functions/fence_blockers.sql",
    "sql/cqrs/functions/work_pending.sql",
    "sql/cqrs/privileges.sql",
    "sql/shop_proj/functions/apply_customer_stats.sql",
    "migrations/versions/0003/after.sql",
]
# The cqrs core's version "0003" (cqrs_pg.core): the steps of SOURCES that are core,
# frozen by `python -m cqrs_pg.core freeze`.
CORE_SOURCES = [s for s in SOURCES if s.startswith("sql/cqrs/") or s.endswith("0003/after_tables.sql")]
FROZEN = Path(__file__).with_name("0003_refresh_outside_fence.sql")
FROZEN_SHA256 = "a75c34eb5ad56f7bb23e14ab7f5c9b25fdb9db1d896556c1545dc946d49fb1b9"

# Back to 0002: each changed file of sql/ as the revision before froze it (no longer
# calling cqrs._fence), then this revision's own objects go.
DOWNGRADE_SOURCES = [
    "0002_engine_and_commands.sql:sql/cqrs/functions/_ring_doorbell.sql",
    "0001_initial.sql:sql/cqrs/functions/register_projection.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/run_projection.sql",
    "0001_initial.sql:sql/cqrs/functions/claim_batch.sql",
    "0001_initial.sql:sql/cqrs/functions/complete_batch.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_begin.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_step.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_claim.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_complete.sql",
    "0002_engine_and_commands.sql:sql/cqrs/functions/rebuild_finish.sql",
    "0001_initial.sql:sql/cqrs/functions/fence_status.sql",
    "0001_initial.sql:sql/cqrs/functions/fence_blockers.sql",
    "0002_engine_and_commands.sql:sql/shop_proj/functions/apply_customer_stats.sql",
    "migrations/versions/0003/downgrade_after.sql",
]
FROZEN_DOWNGRADE = Path(__file__).with_name("0003_refresh_outside_fence.downgrade.sql")
FROZEN_DOWNGRADE_SHA256 = "60f6b0dba1f98662d1a0ea1c0d66be1924e4dc28bf60cafc8bf9162e81f6925d"


def upgrade() -> None:
    run_frozen(op, FROZEN, FROZEN_SHA256)


def downgrade() -> None:
    run_frozen(op, FROZEN_DOWNGRADE, FROZEN_DOWNGRADE_SHA256)
