-- cqrs_0007: a round starts as soon as the command it waits for commits. The wait for a
-- daemon's mark looks again at once for a given spin before it sleeps between looks
-- (pg_sleep's finest step is a millisecond), and a shared round can wait for the mark
-- itself (cqrs.run_projections), one round trip after the look that took it.

DROP FUNCTION cqrs.mark_usable(text, interval);
DROP FUNCTION cqrs.run_projections(text[], integer);

-- sql/cqrs/functions/mark_usable.sql
-- Whether a daemon's mark (cqrs.take_mark) is usable: every transaction that ran when it
-- was taken has ended. True when the daemon has none. Waits up to `wait` for it, so that
-- the daemon need not ask again and again; it reads only, and holds no xid meanwhile.
-- For the first `spin` of the wait it looks again at once, then every half millisecond:
-- pg_sleep's finest step is a millisecond, on average half a millisecond after the
-- commit it waits for. A daemon that found one command in flight while lingering spins:
-- that command commits within a millisecond or two, and the round should start with it.
CREATE OR REPLACE FUNCTION cqrs.mark_usable(listener_id text, wait interval DEFAULT '0 s',
                                            spin interval DEFAULT '0 s')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    started timestamptz := clock_timestamp();
    mark xid8;
BEGIN
    SELECT l.mark_xmax INTO mark FROM cqrs.listeners l WHERE l.listener_id = mark_usable.listener_id;
    -- each time a statement of its own: a new snapshot
    WHILE mark IS NOT NULL AND mark > cqrs._fence(pg_current_snapshot()) LOOP
        IF clock_timestamp() >= started + wait THEN
            RETURN false;
        END IF;
        IF clock_timestamp() >= started + spin THEN
            PERFORM pg_sleep(0.0005);
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- sql/cqrs/functions/run_projections.sql
-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection. They
-- share one read limit (cqrs._read_limit, read before the first lock gives the
-- transaction its xid: its position is a mark for each, cqrs._run_batch). A failing
-- apply function rolls back every batch of the call; the daemon then runs each
-- projection on its own, where the failure is that projection's alone.
-- With listener_id, it first waits as cqrs.mark_usable(listener_id, mark_wait, mark_spin)
-- for that daemon's mark: the round then reads what committed up to the mark, one round
-- trip after the look that took it.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000,
                                                listener_id text DEFAULT NULL, mark_wait interval DEFAULT '0 s',
                                                mark_spin interval DEFAULT '0 s')
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    p cqrs.projections;
    r record;
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    PERFORM cqrs._require_range('max_events', max_events, 1);
    IF listener_id IS NOT NULL THEN
        PERFORM cqrs.mark_usable(listener_id, mark_wait, mark_spin);
    END IF;
    SELECT * INTO lim FROM cqrs._read_limit();
    FOREACH projection IN ARRAY projections LOOP
        p := cqrs._projection(projection);
        IF p.kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        SELECT * INTO r FROM cqrs._run_batch(p, max_events, '1 second', lim.final_position, lim.fence,
                                            lim.mark_position, lim.pending_position);
        applied := r.applied;
        more := r.more;
        busy := r.busy;
        RETURN NEXT;
    END LOOP;
END
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.mark_usable(text, interval, interval),
    cqrs.run_projections(text[], integer, text, interval, interval) TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0007';
