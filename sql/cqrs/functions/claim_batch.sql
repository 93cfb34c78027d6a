-- A python projection's daemon, step 1 of 3, in one transaction with the other two:
-- takes the projection's lock (busy: another daemon holds it; nothing else is returned)
-- and returns the next batch after the checkpoint below the fence, as cqrs.run_projection
-- finds it: from_tx/from_position (the checkpoint), to_tx/to_position (the batch end;
-- NULL when there is nothing to apply, n = 0) and the fence. The daemon then reads the
-- batch (cqrs.batch_events), lets the handler write, and calls cqrs.complete_batch.
CREATE OR REPLACE FUNCTION cqrs.claim_batch(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (from_tx xid8, from_position bigint, to_tx xid8, to_position bigint, n bigint, fence xid8, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    f xid8;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    -- the lock of cqrs.run_projection: released at commit, after our checkpoint is visible
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT NULL::xid8, NULL::bigint, NULL::xid8, NULL::bigint, 0::bigint, NULL::xid8, true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    f := cqrs._fence();
    SELECT * INTO b FROM cqrs._next_batch(p.last_tx, p.last_position, f, max_events);
    IF b.end_tx IS NULL THEN
        -- nothing new below the fence: at most the horizon moves up, as in run_projection
        PERFORM cqrs._advance_checkpoint(projection, NULL, NULL, 0, f, false, false);
    END IF;
    RETURN QUERY SELECT p.last_tx, p.last_position, b.end_tx, b.end_position, b.n, f, false;
END
$$;
