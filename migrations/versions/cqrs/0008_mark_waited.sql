-- cqrs_0008: a shared round reports how long it waited for the daemon's mark
-- (cqrs.run_projections' waited), so that the daemon's apply budget charges the round's
-- work only: waiting for commands in flight to commit is no work. A batch is looked up
-- once more under the projection's lock only if its checkpoint moved meanwhile
-- (cqrs._run_batch).

DROP FUNCTION cqrs.run_projections(text[], integer, text, interval, interval);

-- sql/cqrs/functions/_run_batch.sql
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
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, _run_batch.final_position,
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
    -- (cqrs._lock), which no role but the engine's owner can take. Released at commit,
    -- after our checkpoint is visible, so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock('projection', projection, false) THEN
        busy := true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    -- Read again only if another session moved the checkpoint meanwhile: up to the final
    -- position every event has committed, so the same bounds find the same batch. A
    -- view's refresh covers every event up to the final position.
    IF p.last_position IS DISTINCT FROM read_from THEN
        SELECT * INTO b FROM cqrs._next_batch(p.last_position, _run_batch.final_position,
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

-- sql/cqrs/functions/run_projections.sql
-- One batch of each of these sql projections, in the caller's transaction: what
-- cqrs.run_projection does for each, in order, under one commit. The daemon's round when
-- batches are small: one statement and one commit instead of one per projection. They
-- share one read limit (cqrs._read_limit, read before the first lock gives the
-- transaction its xid: its position is a mark for each, cqrs._run_batch). A failing
-- apply function rolls back every batch of the call; the daemon then runs each
-- projection on its own, where the failure is that projection's alone.
-- With listener_id, it first waits as cqrs.mark_usable(listener_id, mark_wait, mark_spin)
-- for that daemon's mark: the round then reads what committed up to the mark, one round
-- trip after the look that took it. waited: the seconds that took (on every row), which
-- the daemon's apply budget does not charge: waiting for commands to commit is not work.
-- Returns a row per projection, in the order given, as cqrs.run_projection's.
CREATE OR REPLACE FUNCTION cqrs.run_projections(projections text[], max_events integer DEFAULT 10000,
                                                listener_id text DEFAULT NULL, mark_wait interval DEFAULT '0 s',
                                                mark_spin interval DEFAULT '0 s')
RETURNS TABLE (projection text, applied bigint, more boolean, busy boolean, waited double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    p cqrs.projections;
    r record;
    started timestamptz;
BEGIN
    IF projections IS NULL OR cardinality(projections) = 0 THEN
        PERFORM cqrs._fail('CQ001', 'projections must name at least one projection');
    END IF;
    PERFORM cqrs._require_range('max_events', max_events, 1);
    waited := 0;
    IF listener_id IS NOT NULL THEN
        started := clock_timestamp();
        PERFORM cqrs.mark_usable(listener_id, mark_wait, mark_spin);
        waited := extract(epoch FROM clock_timestamp() - started)::double precision;
    END IF;
    SELECT * INTO lim FROM cqrs._read_limit();
    FOREACH projection IN ARRAY projections LOOP
        p := cqrs._projection(projection);
        IF p.kind <> 'sql' THEN
            PERFORM cqrs._fail('CQ001', format(
                'projection %L is not a sql projection: run it with cqrs.run_projection', projection));
        END IF;
        SELECT * INTO r FROM cqrs._run_batch(p, max_events, '1 second', lim.final_position, lim.fence,
                                            lim.mark_position, lim.pending_position);
        applied := r.applied;
        more := r.more;
        busy := r.busy;
        RETURN NEXT;
    END LOOP;
END
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.run_projections(text[], integer, text, interval, interval) TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0008';
