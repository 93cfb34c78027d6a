-- Applying a parked event again (queued by cqrs.retry_projection), step 1 of 2, in one
-- transaction with cqrs.apply_parked: takes the projection's lock (busy when another
-- daemon holds it) and returns the first queued parked event's position (NULL: none) and
-- the search_path the projection's writes resolve in. For a python projection the daemon
-- then reads the event (cqrs.batch_events(projection, position - 1, position)) and runs
-- the handler before step 2.
CREATE OR REPLACE FUNCTION cqrs.claim_parked(projection text)
RETURNS TABLE ("position" bigint, busy boolean, search_path text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._lock('projection', projection, false) THEN
        RETURN QUERY SELECT NULL::bigint, true, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT min(k.position), false, p.search_path
          FROM cqrs.parked k
         WHERE k.projection = claim_parked.projection AND k.retry;
END
$$;
