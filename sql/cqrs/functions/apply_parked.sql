-- Applying a parked event again, step 2 of 2, in the transaction that claimed it
-- (cqrs.claim_parked): a sql projection's apply function runs over that one event (a
-- python projection's handler has run already); the event leaves cqrs.parked and counts as
-- applied. The checkpoint, long past the event, stays where it is.
CREATE OR REPLACE FUNCTION cqrs.apply_parked(projection text, "position" bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._holds_lock('projection', projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_parked first', projection));
    END IF;
    DELETE FROM cqrs.parked k
     WHERE k.projection = apply_parked.projection AND k.position = apply_parked.position AND k.retry;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format(
            'event %s of projection %L is not parked for another try', apply_parked.position, projection));
    END IF;
    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function::regproc, p.search_path, apply_parked.position - 1, apply_parked.position);
    END IF;
    UPDATE cqrs.projections c SET applied_events = c.applied_events + 1, updated_at = now() WHERE c.name = projection;
END
$$;
