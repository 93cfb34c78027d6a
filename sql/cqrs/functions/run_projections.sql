-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection. They
-- share one read limit (cqrs._read_limit, read before the first lock gives the
-- transaction its xid: its position is a mark for each), and projections at the same
-- checkpoint one batch (final events do not change). A failing apply function rolls back
-- every batch of the call; the daemon then runs each projection on its own, where the
-- failure is that projection's alone.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000)
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    p cqrs.projections;
    b record;
    batch_from bigint;  -- the checkpoint b was read after
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO lim FROM cqrs._read_limit();
    FOREACH projection IN ARRAY projections LOOP
        p := cqrs._projection(projection);
        IF p.kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        applied := 0;
        more := false;
        busy := false;
        -- as in cqrs.run_projection: an idle projection is found by reading alone
        IF batch_from IS DISTINCT FROM p.last_position THEN
            SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position, max_events);
            batch_from := p.last_position;
        END IF;
        IF b.n > 0 OR cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
            -- the projection's lock (cqrs._lock), and its row as the last holder left it
            SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR NO KEY UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                busy := true;
            ELSE
                IF batch_from <> p.last_position THEN
                    SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position, max_events);
                    batch_from := p.last_position;
                END IF;
                IF b.n > 0 THEN
                    PERFORM cqrs._apply_batch(p.apply_function::regproc, p.search_path, p.last_position, b.end_position);
                    PERFORM cqrs._advance_checkpoint(projection, false, b.end_position, b.n, false,
                                                     lim.final_position, lim.fence, lim.mark_position);
                    applied := b.n;
                    more := b.n >= max_events;
                ELSIF cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
                    -- nothing to apply: only a mark or a horizon that is due
                    PERFORM cqrs._advance_checkpoint(projection, false, p.last_position, 0, false,
                                                     lim.final_position, lim.fence, lim.mark_position);
                END IF;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
