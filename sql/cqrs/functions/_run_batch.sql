-- The body of cqrs.run_projection for projection p (sql or matview), on a read limit
-- already read (cqrs._read_limit's columns, read before this transaction took an xid):
-- cqrs.run_projection reads one for its projection, cqrs.run_projections one for all of
-- its projections, whose batches then share its position as their mark.
CREATE OR REPLACE FUNCTION cqrs._run_batch(
    p cqrs.projections, max_events integer, refresh_interval interval,
    final_position bigint, fence xid8, mark_position bigint, pending_position bigint,
    OUT applied bigint, OUT more boolean, OUT busy boolean, OUT retry_after double precision)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    projection text := p.name;
    b record;
    relevant boolean := false;
    read_from bigint := p.last_position;
BEGIN
    applied := 0;
    more := false;
    busy := false;
    -- Before any lock, with no xid yet: an idle projection is found by reading alone (no
    -- xid to hold readers back, no WAL).
    b := cqrs._next_batch(p.last_position, _run_batch.final_position,
                          CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);
    IF b.n = 0 AND NOT cqrs._write_due(p, _run_batch.final_position, _run_batch.fence, _run_batch.mark_position,
                                       _run_batch.pending_position) THEN
        RETURN;
    END IF;
    -- A view's refresh is left out of every reader's fence (it writes no events), which
    -- only a transaction without an xid can be: before the lock gives it one.
    IF p.kind = 'matview' AND b.n > 0 AND NOT coalesce(p.refreshed_at > now() - refresh_interval, false) THEN
        PERFORM cqrs._exempt_from_fence(projection);
    END IF;

    -- One runner per projection at a time, across daemons: the projection's row lock
    -- (as cqrs._lock takes it), which no role but the engine's owner can take, and the
    -- row as it is under the lock, in one statement. Released at commit, after our
    -- checkpoint is visible, so the next holder reads the checkpoint we wrote.
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        busy := true;
        RETURN;
    END IF;
    -- Read again only if another session moved the checkpoint meanwhile: up to the final
    -- position every event has committed, so the same bounds find the same batch. A
    -- view's refresh covers every event up to the final position.
    IF p.last_position IS DISTINCT FROM read_from THEN
        b := cqrs._next_batch(p.last_position, _run_batch.final_position,
                              CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);
    END IF;

    IF b.n = 0 THEN
        -- Nothing to apply: write only a mark or a horizon that is due.
        IF cqrs._write_due(p, _run_batch.final_position, _run_batch.fence, _run_batch.mark_position,
                           _run_batch.pending_position) THEN
            PERFORM cqrs._advance_checkpoint(projection, false, p.last_position, 0, false,
                                             _run_batch.final_position, _run_batch.fence, _run_batch.mark_position);
        END IF;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function::regproc, p.search_path, p.last_position, b.end_position);
    ELSE
        SELECT EXISTS (
            SELECT 1
              FROM cqrs.outbox o
             WHERE o.position > p.last_position
               AND o.position <= b.end_position
               AND (p.event_types IS NULL OR o.event_type = ANY (p.event_types)))
          INTO relevant;
        IF relevant THEN
            IF p.refreshed_at > now() - refresh_interval THEN
                retry_after := extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- out of every reader's fence while it runs (cqrs._exempt_from_fence, above)
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview::regclass);
        END IF;
    END IF;

    PERFORM cqrs._advance_checkpoint(projection, false, b.end_position, b.n, relevant,
                                     _run_batch.final_position, _run_batch.fence, _run_batch.mark_position);
    applied := b.n;
    more := p.kind = 'sql' AND b.n >= max_events;
END
$$;
