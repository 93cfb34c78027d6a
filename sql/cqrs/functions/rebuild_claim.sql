-- A python projection's rebuild, step 1 of 3, in one transaction with cqrs.rebuild_events,
-- the handler's writes to the shadow tables and cqrs.rebuild_complete: the next batch
-- after the rebuild's checkpoint, as cqrs.rebuild_step finds it (to_position NULL, n = 0:
-- nothing), and the shadow schema that must be the handler's search_path. final: also
-- take the projection's lock, waiting for a daemon's batch, so the live tables stand
-- still until this transaction, which catches the shadow up and then calls
-- cqrs.rebuild_finish, commits.
CREATE OR REPLACE FUNCTION cqrs.rebuild_claim(projection text, max_events integer DEFAULT 10000, final boolean DEFAULT false)
RETURNS TABLE (from_position bigint, to_position bigint, n bigint, shadow_schema name)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    -- before the lock below gives this transaction an xid: its position read can be a mark
    SELECT * INTO lim FROM cqrs._read_limit();
    -- the rebuild's row, then the projection's lock: the order of cqrs.rebuild_finish
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_claim.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF final THEN
        PERFORM cqrs._lock_projection(projection, true);
    END IF;
    SELECT * INTO b FROM cqrs._next_batch(r.last_position, r.ahead, lim.final_position, max_events);
    -- for cqrs.rebuild_complete to check the batch against
    PERFORM cqrs._advance_checkpoint(projection, true, b.start_position, b.ahead_left, 0, false,
                                     lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.start_position, b.end_position, b.n, r.shadow_schema;
END
$$;
