"""The cqrs core, the shop write model and its commands, the read model, the roles.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

from cqrs_pg.sqlsource import run_frozen

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# sql/ as of this revision, frozen: python -m cqrs_pg.sqlsource freeze
FROZEN = Path(__file__).with_name("0001_initial.sql")
FROZEN_SHA256 = "e77246811d874b9382aa4d7ee59f383ac6f9c5d936abfee4db91eaeeb187244c"


def upgrade() -> None:
    run_frozen(op, FROZEN, FROZEN_SHA256)


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS shop_proj, shop_read, shop, cqrs CASCADE")
    # Roles are cluster-wide: keep one that another database still uses.
    op.execute(
        """
        DO $$
        DECLARE
            r text;
        BEGIN
            FOREACH r IN ARRAY ARRAY['cqrs_writer', 'cqrs_reader', 'cqrs_listener'] LOOP
                BEGIN
                    EXECUTE format('DROP ROLE IF EXISTS %I', r);
                EXCEPTION WHEN dependent_objects_still_exist THEN
                    RAISE NOTICE 'role % is still used in another database: kept', r;
                END;
            END LOOP;
        END
        $$
        """
    )
