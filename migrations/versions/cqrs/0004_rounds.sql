-- cqrs_0004: a daemon's round of small batches costs less. Helper functions on every
-- batch's path are PL/pgSQL, whose queries a session plans once (SQL functions with a SET
-- clause are planned again in every transaction); cqrs.run_projections runs a batch of
-- several sql projections in one statement and one commit.

-- sql/cqrs/functions/_fence.sql
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

-- sql/cqrs/functions/_horizon.sql
-- An xid below which every transaction has all its events at or below after_position,
-- for a reader that has applied everything up to there: the fence, or the oldest
-- transaction with an event after it. NULL when more than 5,000 events may lie after it
-- (a catch-up: not worth reading now; the caller keeps the horizon it has). Cheap by
-- default: more than 5,000 positions handed out after it are taken for that many events;
-- with thorough, the events themselves are counted (positions of rolled-back
-- transactions take no event).
-- PL/pgSQL: its queries are planned once per session, not in every batch's transaction.
CREATE OR REPLACE FUNCTION cqrs._horizon(after_position bigint, fence xid8, thorough boolean DEFAULT false)
RETURNS xid8
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) - after_position <= 5000 THEN
        RETURN least(fence, (SELECT min(o.tx_id) FROM cqrs.outbox o WHERE o.position > after_position));
    ELSIF thorough THEN
        RETURN (SELECT CASE WHEN count(*) <= 5000 THEN least(fence, min(x.tx_id)) END
                  FROM (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position > after_position
                         ORDER BY o.position LIMIT 5001) x);
    END IF;
    RETURN NULL;
END
$$;

-- sql/cqrs/functions/_write_due.sql
-- Whether projection p, with nothing to apply, still has something to write: a mark that
-- lets the events committed meanwhile be read soon (cqrs._needs_mark), or a horizon its
-- last batch put off (cqrs._horizon). The rest of cqrs._read_limit's answer is given.
-- An idle projection without either writes nothing.
-- PL/pgSQL: planned once per session (a SQL function with a SET clause is never inlined).
CREATE OR REPLACE FUNCTION cqrs._write_due(p cqrs.projections, final_position bigint, fence xid8,
                                           mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN cqrs._needs_mark(p.mark_xmax, final_position, fence, mark_position, pending_position)
        OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, fence, true) > p.horizon);
END
$$;

-- sql/cqrs/functions/run_projections.sql
-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection, and
-- each reads up to the same final position (the first to write stores it for the
-- others). A failing apply function rolls back every batch of the call; the daemon then
-- runs each projection on its own, where the failure is that projection's alone.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000)
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    FOREACH projection IN ARRAY projections LOOP
        IF (cqrs._projection(projection)).kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        SELECT * INTO r FROM cqrs.run_projection(projection, max_events);
        applied := r.applied;
        more := r.more;
        busy := r.busy;
        RETURN NEXT;
    END LOOP;
END
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.run_projections(text[], integer) TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0004';
