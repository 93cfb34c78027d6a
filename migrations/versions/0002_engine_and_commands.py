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
    "migrations/versions/0002/after.sql",
]
FROZEN = Path(__file__).with_name("0002_engine_and_commands.sql")
FROZEN_SHA256 = "6fa80e08a5131414ce7407a56b26c99354d4a1eb67bc9e54ffcfe48dc575c90b"


# Back to 0001: undo this revision's own steps, then restore each changed file of sql/
# as 0001 froze it ("0001_initial.sql:sql/...").
DOWNGRADE_SOURCES = [
    "migrations/versions/0002/downgrade.sql",
]
FROZEN_DOWNGRADE = Path(__file__).with_name("0002_engine_and_commands.downgrade.sql")
FROZEN_DOWNGRADE_SHA256 = "7cf8f948125bb5e365339a535af3a053fddd93210687e35b8251a2b496941c47"


def upgrade() -> None:
    run_frozen(op, FROZEN, FROZEN_SHA256)


def downgrade() -> None:
    run_frozen(op, FROZEN_DOWNGRADE, FROZEN_DOWNGRADE_SHA256)
