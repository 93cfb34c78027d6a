-- Applies the next batch of the event log to a sql projection's rebuild's shadow tables,
-- up to the final position, and advances the rebuild's own checkpoint. `more`: a full
-- batch, call again. (A python projection's handler applies its batches: cqrs.claim_batch
-- with rebuild.)
CREATE OR REPLACE FUNCTION cqrs.rebuild_step(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (applied bigint, more boolean)
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
    -- before the lock below gives this transaction an xid: its position read can be a mark
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_step.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    IF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s projection: its handler applies the batches of its rebuild '
            '(cqrs.claim_batch, cqrs.batch_events, cqrs.complete_batch with rebuild)', projection, p.kind));
    END IF;
    PERFORM cqrs._lock('rebuild', projection, true);
    PERFORM cqrs._rebuild_reads(r);
    SELECT * INTO b FROM cqrs._next_batch(r.last_position, lim.final_position, max_events);
    IF b.n > 0 THEN
        PERFORM cqrs._apply_batch(p.apply_function::regproc, quote_ident(r.shadow_schema), r.last_position, b.end_position);
    END IF;
    -- the rebuild's row is locked (this transaction writes) already: the mark costs nothing more
    PERFORM cqrs._advance_checkpoint(projection, true, coalesce(b.end_position, r.last_position), b.n, false,
                                     lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.n, b.n >= max_events;
END
$$;
