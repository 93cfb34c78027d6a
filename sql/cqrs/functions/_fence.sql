-- The fence of a snapshot: every transaction with a lower xid has ended, or is a
-- materialized view's refresh that can write no events (cqrs._exempt_from_fence).
-- Without refreshes running it is pg_snapshot_xmin(snap): the lowest in-progress xid, or
-- xmax when none is. pg_snapshot_xip lists top-level xids only, so a refresh run inside
-- a subtransaction (whose lock holds the subxid) is never left out.
-- The xid-to-xid8 match by the low 32 bits is exact: in-progress xids are less than 2^31
-- apart, and VACUUM's freezing clears a lock's xmax long before its xid could recur.
-- PL/pgSQL, not SQL: a session plans its query once, not in every transaction that asks
-- (a SQL function with a SET clause is never inlined).
CREATE OR REPLACE FUNCTION cqrs._fence(snap pg_snapshot)
RETURNS xid8
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- The caller's own transaction, when it has an xid, is running too, though its own
    -- snapshot does not list it: without it the fence could pass an xid not handed out
    -- yet (one batch after another in one transaction, cqrs.run_projections).
    RETURN least(coalesce(
                     (SELECT min(x.x)
                        FROM pg_snapshot_xip(snap) AS x(x)
                       WHERE NOT cqrs._left_out_of_fence(x.x::xid)),
                     pg_snapshot_xmax(snap)),
                 pg_current_xact_id_if_assigned());
END
$$;
