-- A python projection's daemon, step 1 of 3, in one transaction with the other two:
-- takes the projection's lock (busy: another daemon holds it; nothing else is returned)
-- and returns the next batch after the checkpoint, as cqrs.run_projection finds it:
-- from_position, to_position (NULL when there is nothing to apply, n = 0). The daemon then
-- reads the batch (cqrs.batch_events), lets the handler write, and calls
-- cqrs.complete_batch. How far reading may go is stored now, for complete_batch to check
-- the batch against.
CREATE OR REPLACE FUNCTION cqrs.claim_batch(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (from_position bigint, to_position bigint, n bigint, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    lim record;
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
        RETURN QUERY SELECT NULL::bigint, NULL::bigint, 0::bigint, true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, p.ahead, lim.final_position, max_events);
    -- as in run_projection, an idle projection writes nothing
    IF b.n > 0 OR b.start_position > p.last_position
       OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                           lim.pending_position)
       OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, lim.fence, true) > p.horizon) THEN
        PERFORM cqrs._advance_checkpoint(projection, false, b.start_position, b.ahead_left, 0, false,
                                         lim.final_position, lim.fence, lim.mark_position);
    END IF;
    RETURN QUERY SELECT b.start_position, b.end_position, b.n, false;
END
$$;
