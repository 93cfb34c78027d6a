-- A python projection's batch, step 1 of 3, in one transaction with the other two: for
-- the daemon (rebuild false) or for a rebuild of the projection (rebuild true, into its
-- shadow tables). Takes the lock (the projection's: busy when another daemon holds it,
-- and nothing else is returned; a rebuild's: waiting for it) and returns the next batch
-- after the checkpoint: from_position, to_position (NULL when there is nothing to apply,
-- n = 0), and the search_path the handler's unqualified table names must resolve in (the
-- projection's schemas, or only the rebuild's shadow schema). The caller then reads the
-- batch (cqrs.batch_events), lets the handler write, and calls cqrs.complete_batch. How
-- far reading may go is stored now, for complete_batch to check the batch against.
-- final (a rebuild's): also take the projection's lock, waiting for a daemon's batch, so
-- the live tables stand still until this transaction, which catches the shadow up and
-- then calls cqrs.rebuild_finish, commits.
CREATE OR REPLACE FUNCTION cqrs.claim_batch(
    projection text, max_events integer DEFAULT 10000, rebuild boolean DEFAULT false, final boolean DEFAULT false)
RETURNS TABLE (from_position bigint, to_position bigint, n bigint, busy boolean, search_path text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    r cqrs.rebuilds;
    lim record;
    b record;
    checkpoint bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s projection: %s applies it', projection, p.kind,
            CASE WHEN rebuild THEN 'cqrs.rebuild_step' ELSE 'cqrs.run_projection' END));
    END IF;
    IF rebuild THEN
        -- before the locks below give this transaction an xid: its position read can be a mark
        SELECT * INTO lim FROM cqrs._read_limit();
        -- the rebuild's lock (its row), then the projection's: the order of cqrs.rebuild_finish
        IF NOT cqrs._lock('rebuild', projection, true) THEN
            PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
        END IF;
        SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = claim_batch.projection;
        IF final THEN
            PERFORM cqrs._lock('projection', projection, true);
            -- as in cqrs.rebuild_finish: a daemon's batch that read its limit after this
            -- one may have committed while this waited for the locks; read it again
            IF (cqrs._projection(projection)).last_position > lim.final_position THEN
                SELECT * INTO lim FROM cqrs._read_limit();
            END IF;
        END IF;
        PERFORM cqrs._rebuild_reads(r);
        checkpoint := r.last_position;
    ELSE
        -- as in cqrs.run_projection: read before any lock (no xid: a mark), and an idle
        -- projection is found by reading alone
        SELECT * INTO lim FROM cqrs._read_limit();
        SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position, max_events);
        IF b.n = 0
           AND NOT cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
            RETURN QUERY SELECT p.last_position, NULL::bigint, 0::bigint, false, p.search_path;
            RETURN;
        END IF;
        -- the lock of cqrs.run_projection: released at commit, after our checkpoint is visible
        IF NOT cqrs._lock('projection', projection, false) THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, 0::bigint, true, NULL::text;
            RETURN;
        END IF;
        SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
        checkpoint := p.last_position;
    END IF;
    SELECT * INTO b FROM cqrs._next_batch(checkpoint, lim.final_position, max_events);
    -- as in run_projection, an idle projection writes nothing
    IF rebuild OR b.n > 0
       OR cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
        PERFORM cqrs._advance_checkpoint(projection, rebuild, checkpoint, 0, false,
                                         lim.final_position, lim.fence, lim.mark_position);
    END IF;
    RETURN QUERY SELECT checkpoint, b.end_position, b.n, false,
                        CASE WHEN rebuild THEN quote_ident(r.shadow_schema) ELSE p.search_path END;
END
$$;
