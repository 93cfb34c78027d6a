"""A round of small batches costs less: a small batch runs on generic plans made once per
session, no batch is JIT compiled, the look for work takes the round's mark on the same
read limit, a shared round reads one read limit for all its projections, and the horizon
is found on one generic plan.

Revision ID: cqrs_0006
Revises: cqrs_0005
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg import core

revision = "cqrs_0006"
down_revision = "cqrs_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    core.run_sql(op, core.revision_sql(Path(__file__).with_suffix(".sql")))


def downgrade() -> None:
    core.forward_only("cqrs_0006")
