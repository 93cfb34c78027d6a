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
