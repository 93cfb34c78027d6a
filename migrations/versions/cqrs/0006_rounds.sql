-- cqrs_0006: a round of small batches costs less. A small batch's apply function runs on
-- generic plans made once per session (cqrs._apply_small_batch), and no batch is JIT
-- compiled. The daemon's look for work takes the round's mark on the same read limit
-- (cqrs.look_for_work), and says when all is settled, so that the daemon can watch the
-- outbox's sequence alone in between (cqrs.last_position). A shared round reads one read
-- limit for all its projections (cqrs._run_batch, run_projection's body on a read limit
-- given); cqrs._horizon walks at most 5,001 events on one generic plan.

-- sql/cqrs/functions/_apply_small_batch.sql
-- Runs a sql projection's apply function over a small batch (for cqrs._apply_batch) on
-- generic plans, made once per session, as for a few events: index lookups and nested
-- loops. A generic plan cannot see the bounds, and guesses a share of the whole outbox
-- for the batch: made freely, its joins hashed whole read models (60 ms a batch at 1M
-- orders, measured) where a handful of index lookups do. Nested loops over a batch of at
-- most 1,000 positions stay small, whatever the statement. The caller's search_path
-- stays: the projection's.
CREATE OR REPLACE FUNCTION cqrs._apply_small_batch(apply_function regproc, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;
END
$$;

-- sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
-- Plans (unless the apply function sets plan_cache_mode itself): a batch over at most
-- 1,000 positions runs on generic plans, made once per session as for a small batch
-- (cqrs._apply_small_batch): planning a set-based statement for its bounds costs more
-- than applying a few events. A larger one gets plans made for its bounds, whose
-- estimates a catch-up's thousands of events need. No JIT: compiling a statement takes
-- tens of milliseconds, longer than a batch's statements run.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $$
DECLARE
    call text := format('SELECT %s($1, $2)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    IF to_position - from_position <= 1000 THEN
        PERFORM cqrs._apply_small_batch(apply_function, from_position, to_position);
    ELSE
        EXECUTE call USING from_position, to_position;
    END IF;
END
$$;

-- sql/cqrs/functions/_horizon.sql
-- An xid below which every transaction has all its events at or below after_position,
-- for a reader that has applied everything up to there: the fence, or the oldest
-- transaction with an event after it. NULL when more than 5,000 events may lie after it
-- (a catch-up: not worth reading now; the caller keeps the horizon it has). Cheap by
-- default: more than 5,000 positions handed out after it are taken for that many events;
-- with thorough, the events themselves are counted (positions of rolled-back
-- transactions take no event).
-- PL/pgSQL, one generic plan: the primary key's walk from after_position over at most
-- 5,001 events, planned once per session (a plan of the bare bound was made again for
-- every batch: 0.4 ms at 3M events).
CREATE OR REPLACE FUNCTION cqrs._horizon(after_position bigint, fence xid8, thorough boolean DEFAULT false)
RETURNS xid8
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF thorough OR coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) - after_position <= 5000 THEN
        RETURN (SELECT CASE WHEN count(*) <= 5000 THEN least(fence, min(x.tx_id)) END
                  FROM (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position > after_position
                         ORDER BY o.position LIMIT 5001) x);
    END IF;
    RETURN NULL;
END
$$;

-- sql/cqrs/functions/_work_pending.sql
-- cqrs.work_pending's answer for a read limit already read (cqrs._read_limit's columns).
CREATE OR REPLACE FUNCTION cqrs._work_pending(projections text[], final_position bigint, fence xid8,
                                              mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND (EXISTS (SELECT 1
                          FROM cqrs.outbox o
                         WHERE o.position > p.last_position
                           AND o.position <= _work_pending.final_position)
                OR cqrs._needs_mark(p.mark_xmax, _work_pending.final_position, _work_pending.fence,
                                    _work_pending.mark_position, _work_pending.pending_position)));
END
$$;

-- sql/cqrs/functions/work_pending.sql
-- Whether any of these projections (sql or python) has work: committed events up to the
-- final position that it has not applied, or a mark to leave (cqrs._needs_mark). The
-- daemon's poll while it lingers awake after its last events: reads only, cheaper than a
-- round of cqrs.run_projection calls (0.2 ms each, measured), so the daemon can look every
-- few milliseconds and start a round only when there is work. Materialized views are left
-- out: their refresh waits for its own timer (refresh_interval) anyway.
CREATE OR REPLACE FUNCTION cqrs.work_pending(projections text[])
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
END
$$;

-- sql/cqrs/functions/_take_mark.sql
-- cqrs.take_mark for a read limit already read (cqrs._read_limit's columns), before this
-- transaction took an xid.
CREATE OR REPLACE FUNCTION cqrs._take_mark(listener_id text, final_position bigint, fence xid8,
                                           mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l cqrs.listeners;
    marking boolean;
BEGIN
    SELECT * INTO l FROM cqrs.listeners x WHERE x.listener_id = _take_mark.listener_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    marking := cqrs._needs_mark(l.mark_xmax, _take_mark.final_position, fence, _take_mark.mark_position, pending_position);
    IF NOT marking AND _take_mark.final_position <= l.final_position THEN
        RETURN false;  -- nothing new: no write
    END IF;
    -- a mark lost in a crash costs nothing but its use: no need to wait for the disk
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE cqrs.listeners x
       SET final_position = greatest(x.final_position, _take_mark.final_position),
           mark_xmax = CASE WHEN marking THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN marking THEN _take_mark.mark_position ELSE x.mark_position END
     WHERE x.listener_id = _take_mark.listener_id;
    RETURN marking;
END
$$;

-- sql/cqrs/functions/take_mark.sql
-- A daemon's mark for its next round (see cqrs._read_limit): the last position handed out,
-- read before this transaction takes its xid, stored in the daemon's row of
-- cqrs.listeners with that xid. Once the transactions running now have ended
-- (cqrs.mark_usable), a round reads everything committed up to here, instead of what the
-- marks of the round before cover: under steady writes that is one round fresher. When
-- nothing runs now, that position is final at once: stored as the row's final position,
-- so that the round's projections read up to it whatever they find running then (each
-- other's batches).
-- Returns whether it stored a mark to wait for: not when nothing beyond the final
-- position needs one, or when the daemon's mark still waits (cqrs._needs_mark). Call it
-- in a transaction of its own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.take_mark(listener_id text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
END
$$;

-- sql/cqrs/functions/look_for_work.sql
-- The daemon's look for work while it lingers: cqrs.work_pending and, when there is work,
-- cqrs.take_mark for the round it starts, on one read limit (cqrs._read_limit, read before
-- the mark's write gives this transaction an xid). marked: NULL when there is no work;
-- otherwise take_mark's answer (true: a mark was stored, to wait for with
-- cqrs.mark_usable). settled_position: with no work, and every position handed out final,
-- the last one: until the outbox's sequence moves past it (cqrs.last_position) no work can
-- appear but by an operator's hand (a checkpoint moved, a projection added), so the
-- daemon may look for it with that one read in between. Call it in a transaction of its
-- own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.look_for_work(projections text[], listener_id text,
                                              OUT marked boolean, OUT settled_position bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    IF cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
        marked := cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position,
                                  lim.pending_position);
    ELSIF lim.final_position >= lim.mark_position THEN
        settled_position := lim.mark_position;
    END IF;
END
$$;

-- sql/cqrs/functions/last_position.sql
-- The last position the outbox's sequence handed out (0: none yet), whether or not its
-- transaction has committed: the daemon's cheapest look for new events between its looks
-- for work (cqrs.look_for_work's settled_position).
CREATE OR REPLACE FUNCTION cqrs.last_position()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
$$;

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
    -- a view's refresh covers every event up to the final position
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, _run_batch.final_position,
                                         CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);

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

-- sql/cqrs/functions/run_projection.sql
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
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a python projection: the daemon runs its handler (cqrs.claim_batch, cqrs.complete_batch)',
            projection));
    END IF;
    -- Before any lock, with no xid yet: the position _read_limit reads can be a mark.
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN QUERY SELECT * FROM cqrs._run_batch(p, max_events, refresh_interval, lim.final_position, lim.fence,
                                              lim.mark_position, lim.pending_position);
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
    r record;
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
GRANT EXECUTE ON FUNCTION cqrs.look_for_work(text[], text), cqrs.last_position() TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0006';
