-- Applies the next batch of one projection in the caller's transaction and advances its
-- checkpoint in that same transaction (sql and matview projections; a python projection
-- is run by the daemon with cqrs.claim_batch and cqrs.complete_batch). Returns what it did:
--   applied      events applied (or, for a matview, covered by the refresh)
--   more         a full batch was applied: call again at once
--   busy         another daemon is running this projection right now
--   retry_after  a matview refresh is due but held back by refresh_interval: seconds left
--
-- Events are read in position order, which is each aggregate's version order, and only up
-- to the final position (cqrs._read_limit): no transaction can add an event there any
-- more, so none can appear behind the checkpoint. A transaction that commits late is
-- delayed, never skipped, and writers take no lock for it. See sql/cqrs/DESIGN.md.
CREATE OR REPLACE FUNCTION cqrs.run_projection(
    projection text,
    max_events integer DEFAULT 10000,
    refresh_interval interval DEFAULT '1 second')
RETURNS TABLE (applied bigint, more boolean, busy boolean, retry_after double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    lim record;
    b record;
    relevant boolean := false;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a python projection: the daemon runs its handler (cqrs.claim_batch, cqrs.complete_batch)',
            projection));
    END IF;

    -- Before any lock, with no xid yet: the position _read_limit reads can be a mark, and
    -- an idle projection is found by reading alone (no xid to hold readers back, no WAL).
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position,
                                         CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);
    IF b.n = 0 AND NOT cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
        RETURN;
    END IF;
    -- A view's refresh is left out of every reader's fence (it writes no events), which
    -- only a transaction without an xid can be: before the lock gives it one.
    IF p.kind = 'matview' AND b.n > 0 AND NOT coalesce(p.refreshed_at > now() - refresh_interval, false) THEN
        PERFORM cqrs._exempt_from_fence(projection);
    END IF;

    -- One runner per projection at a time, across daemons: the projection's row lock
    -- (cqrs._lock), which no role but the engine's owner can take. Released at commit,
    -- after our checkpoint is visible, so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock('projection', projection, false) THEN
        RETURN QUERY SELECT 0::bigint, false, true, NULL::double precision;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    -- a view's refresh covers every event up to the final position
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position,
                                         CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);

    IF b.n = 0 THEN
        -- Nothing to apply: write only a mark or a horizon that is due.
        IF cqrs._write_due(p, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
            PERFORM cqrs._advance_checkpoint(projection, false, p.last_position, 0, false,
                                             lim.final_position, lim.fence, lim.mark_position);
        END IF;
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
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
                RETURN QUERY SELECT 0::bigint, false, false,
                    extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- out of every reader's fence while it runs (cqrs._exempt_from_fence, above)
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview::regclass);
        END IF;
    END IF;

    PERFORM cqrs._advance_checkpoint(projection, false, b.end_position, b.n, relevant,
                                     lim.final_position, lim.fence, lim.mark_position);
    RETURN QUERY SELECT b.n, p.kind = 'sql' AND b.n >= max_events, false, NULL::double precision;
END
$$;
