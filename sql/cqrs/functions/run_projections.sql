-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection. They
-- share one read limit (cqrs._read_limit, read before the first lock gives the
-- transaction its xid: its position is a mark for each, cqrs._run_batch). A failing
-- apply function rolls back every batch of the call; the daemon then runs each
-- projection on its own, where the failure is that projection's alone.
-- With listener_id, it first waits as cqrs.mark_usable(listener_id, mark_wait, mark_spin)
-- for that daemon's mark: the round then reads what committed up to the mark, one round
-- trip after the look that took it. waited: the seconds that took (on every row), which
-- the daemon's apply budget does not charge: waiting for commands to commit is not work.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000,
                                                listener_id text DEFAULT NULL, mark_wait interval DEFAULT '0 s',
                                                mark_spin interval DEFAULT '0 s')
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean, waited double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    p cqrs.projections;
    r record;
    started timestamptz;
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    PERFORM cqrs._require_range('max_events', max_events, 1);
    waited := 0;
    IF listener_id IS NOT NULL THEN
        started := clock_timestamp();
        PERFORM cqrs.mark_usable(listener_id, mark_wait, mark_spin);
        waited := extract(epoch FROM clock_timestamp() - started)::double precision;
    END IF;
    lim := cqrs._read_limit();
    FOREACH projection IN ARRAY projections LOOP
        p := cqrs._projection(projection);
        IF p.kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        r := cqrs._run_batch(p, max_events, '1 second', lim.final_position, lim.fence, lim.mark_position,
                             lim.pending_position);
        applied := r.applied;
        more := r.more;
        busy := r.busy;
        RETURN NEXT;
    END LOOP;
END
$$;
