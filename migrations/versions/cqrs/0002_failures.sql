-- cqrs_0002: a projection's failure stops only that projection. Its policy (on_error:
-- halt or park), its state and the event it halted at live in cqrs.projections; events
-- set aside or skipped in cqrs.parked; the daemon reports failures with
-- cqrs.projection_failed and applies parked events again with cqrs.claim_parked and
-- cqrs.apply_parked; operators run cqrs.retry_projection and cqrs.skip_event.

ALTER TABLE cqrs.projections
    ADD COLUMN on_error text NOT NULL DEFAULT 'halt',
    ADD COLUMN state text NOT NULL DEFAULT 'running',
    ADD COLUMN failed_position bigint,
    ADD COLUMN failed_error text,
    ADD COLUMN failed_sqlstate text,
    ADD COLUMN failed_attempts integer,
    ADD COLUMN failed_at timestamptz,
    ADD CONSTRAINT projections_on_error CHECK (on_error IN ('halt', 'park')),
    ADD CONSTRAINT projections_matview_halts CHECK (kind <> 'matview' OR on_error = 'halt'),
    ADD CONSTRAINT projections_state CHECK (state IN ('running', 'halted')),
    ADD CONSTRAINT projections_halted_at CHECK ((state = 'halted') = (failed_position IS NOT NULL));

-- new arguments or columns: replaced, not redefined in place
DROP FUNCTION cqrs.register_projection(text, text, regproc, regclass, text[], text, regclass[]);
DROP FUNCTION cqrs.projection_status();

-- sql/cqrs/tables/parked.sql
-- Events a projection set aside (outcome 'parked': its policy is 'park' and the event
-- failed after every retry) or an operator skipped (outcome 'skipped', cqrs.skip_event):
-- the checkpoint went past them, and neither is applied. `cqrs-pg retry` asks the daemon
-- to apply the parked ones again (retry true); one that applies leaves this table.
CREATE TABLE cqrs.parked (
    projection  text NOT NULL REFERENCES cqrs.projections (name) ON DELETE CASCADE ON UPDATE CASCADE,
    position    bigint NOT NULL,
    event_type  text NOT NULL,
    outcome     text NOT NULL,
    error       text,
    sqlstate    text,
    attempts    integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    retry       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (projection, position),
    CONSTRAINT parked_outcome CHECK (outcome IN ('parked', 'skipped')),
    CONSTRAINT parked_retry CHECK (outcome = 'parked' OR NOT retry)
);

-- sql/cqrs/functions/_advance_checkpoint.sql
-- Moves a reader's checkpoint, in the caller's transaction (the one that applied the
-- batch): a projection's row, or with rebuild its rebuild's. to_position: the new
-- checkpoint; n: the events applied; refreshed: a matview refresh covered them. A
-- projection's horizon (see cqrs.caught_up) moves up to what cqrs._horizon finds (read
-- thoroughly when no events were applied: a projection with nothing to apply that could
-- not find it after its last batch, cqrs.run_projection). It also keeps what
-- cqrs._read_limit found: the final position, and mark_position (NULL: none) as this
-- transaction's mark, with this transaction's xid, in place of the stored one when that
-- may be replaced (cqrs._mark_replaceable). A halted projection whose checkpoint passes
-- the event it halted at runs again. Shared by every reader of the batch protocol.
CREATE OR REPLACE FUNCTION cqrs._advance_checkpoint(
    projection text, rebuild boolean, to_position bigint, n bigint, refreshed boolean,
    final_position bigint, fence xid8, mark_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    now_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
    new_horizon xid8;
BEGIN
    IF rebuild THEN
        UPDATE cqrs.rebuilds r
           SET last_position = to_position,
               applied_events = r.applied_events + n,
               final_position = greatest(r.final_position, _advance_checkpoint.final_position),
               mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                THEN pg_current_xact_id() ELSE r.mark_xmax END,
               mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                         AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                    THEN _advance_checkpoint.mark_position ELSE r.mark_position END
         WHERE r.projection = _advance_checkpoint.projection;
        RETURN;
    END IF;
    new_horizon := cqrs._horizon(to_position, fence, n = 0);
    UPDATE cqrs.projections c
       SET last_position = to_position,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, new_horizon),
           horizon_position = CASE WHEN new_horizon IS NULL THEN c.horizon_position ELSE to_position END,
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now(),
           -- past the event it halted at: running again
           state = CASE WHEN to_position >= c.failed_position THEN 'running' ELSE c.state END,
           failed_position = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_position END,
           failed_error = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_error END,
           failed_sqlstate = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_sqlstate END,
           failed_attempts = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_attempts END,
           failed_at = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_at END,
           final_position = greatest(c.final_position, _advance_checkpoint.final_position),
           mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                 AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                            THEN pg_current_xact_id() ELSE c.mark_xmax END,
           mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                                THEN _advance_checkpoint.mark_position ELSE c.mark_position END
     WHERE c.name = projection;
END
$$;

-- sql/cqrs/functions/register_projection.sql
-- Registers a projection: kind 'sql' applies batches with apply_function(from_position
-- bigint, to_position bigint), which reads the batch with cqrs.batch and finds its tables
-- through search_path (a list of schemas), and owns the tables listed in `tables`; kind
-- 'matview' refreshes matview CONCURRENTLY when events of event_types (NULL: any) arrive;
-- kind 'python' is applied by the daemon with a Python handler registered under the same
-- name (cqrs_pg.projections.register), its unqualified table names resolved through
-- search_path, seeing only events of event_types (NULL: all), writing the tables listed
-- in `tables` (what cqrs-pg rebuild rebuilds). on_error: what the daemon does with an
-- event that still fails after its retries, 'halt' (stay at it until `cqrs-pg retry` or
-- `cqrs-pg skip`) or 'park' (set it aside, listed by `cqrs-pg parked`, and go on; not for
-- a matview, whose refresh covers every event). A new projection starts from the first
-- event.
CREATE OR REPLACE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL,
    on_error text DEFAULT 'halt')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- at most 50 characters: a rebuild's shadow schema is named cqrs_rebuild_<name>
    PERFORM cqrs._require_text('name', name, 50);
    IF kind IS NULL OR kind NOT IN ('sql', 'matview', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('kind must be ''sql'', ''matview'' or ''python'', not %L', kind));
    END IF;
    IF kind = 'sql' AND (apply_function IS NULL OR search_path IS NULL OR tables IS NULL) THEN
        PERFORM cqrs._fail('CQ001', format(
            'sql projection %L needs apply_function, search_path and tables', name));
    ELSIF kind = 'python' AND search_path IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('python projection %L needs search_path', name));
    ELSIF kind = 'matview' AND matview IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('matview projection %L needs matview', name));
    END IF;
    IF EXISTS (SELECT 1 FROM cqrs.projections c WHERE c.name = register_projection.name) THEN
        PERFORM cqrs._fail('CQ003', format('projection %L is already registered', name));
    END IF;
    IF apply_function IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_proc f
         WHERE f.oid = apply_function
           AND pg_catalog.oidvectortypes(f.proargtypes) = 'bigint, bigint') THEN
        PERFORM cqrs._fail('CQ001', format(
            'apply function %s must take (from_position bigint, to_position bigint)', apply_function));
    END IF;
    IF on_error IS NULL OR on_error NOT IN ('halt', 'park') THEN
        PERFORM cqrs._fail('CQ001', format('on_error must be ''halt'' or ''park'', not %L', on_error));
    END IF;
    IF kind = 'matview' AND on_error = 'park' THEN
        PERFORM cqrs._fail('CQ001', format(
            'matview projection %L cannot park events (a refresh covers them all): use on_error ''halt''', name));
    END IF;
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables, on_error)
    VALUES (name, kind, apply_function, matview, event_types, search_path, tables, on_error);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview';
END
$$;

-- sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint (and the transaction of the last event at or before it),
-- events not yet applied and the age of the oldest of them; its state ('running',
-- 'halted') with the event it halted at and the error, and its events set aside (parked,
-- skipped: cqrs.parked).
-- jit off: the planner cannot know how far behind a projection is, and its guess for a
-- big outbox (a third of it) set off JIT compilation that cost 150 ms (measured).
CREATE OR REPLACE FUNCTION cqrs.projection_status()
RETURNS TABLE (
    name text,
    kind text,
    last_tx xid8,
    last_position bigint,
    horizon xid8,
    applied_events bigint,
    events_behind bigint,
    seconds_behind double precision,
    updated_at timestamptz,
    refreshed_at timestamptz,
    state text,
    on_error text,
    failed_position bigint,
    failed_event_type text,
    failed_error text,
    failed_sqlstate text,
    failed_attempts integer,
    failed_at timestamptz,
    parked bigint,
    skipped bigint)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
    SELECT p.name, p.kind,
           (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position <= p.last_position ORDER BY o.position DESC LIMIT 1),
           p.last_position, p.horizon, p.applied_events,
           behind.n,
           coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           p.updated_at, p.refreshed_at,
           p.state, p.on_error, p.failed_position,
           (SELECT o.event_type FROM cqrs.outbox o WHERE o.position = p.failed_position),
           p.failed_error, p.failed_sqlstate, p.failed_attempts, p.failed_at,
           (SELECT count(*) FROM cqrs.parked k WHERE k.projection = p.name AND k.outcome = 'parked'),
           (SELECT count(*) FROM cqrs.parked k WHERE k.projection = p.name AND k.outcome = 'skipped')
      FROM cqrs.projections p
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE o.position > p.last_position) behind
     ORDER BY p.name;
$$;

-- sql/cqrs/functions/projection_failed.sql
-- The daemon's report that the event after checkpoint after_position failed `attempts`
-- more times, the last with error (sqlstate: NULL for a python handler's exception), after
-- its retries and with the batch narrowed to that one event. Acts by the projection's
-- on_error: 'halt' records the failure and the projection stays at the event (the daemon
-- stops running it; past it, cqrs._advance_checkpoint makes it run again); 'park' records
-- the event in cqrs.parked and moves the checkpoint past it, in this transaction. Returns
-- what it did (outcome 'halted' or 'parked', with the event's position and type), or
-- 'moved' when the checkpoint is no longer after_position (another daemon got past the
-- event): nothing to do.
CREATE OR REPLACE FUNCTION cqrs.projection_failed(
    projection text, after_position bigint, error text, sqlstate text, attempts integer,
    OUT outcome text, OUT "position" bigint, OUT event_type text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    failed cqrs.outbox;
    lim record;
    message text := left(coalesce(error, 'unknown error'), 2000);
    code text := left(sqlstate, 5);
BEGIN
    PERFORM cqrs._require_range('attempts', attempts, 1);
    p := cqrs._projection(projection);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    outcome := 'moved';
    IF p.last_position IS DISTINCT FROM after_position THEN
        RETURN;
    END IF;
    -- the limit every reader shares: the projection's own final_position may lag it (a
    -- failed batch stored nothing)
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO failed
      FROM cqrs.outbox o
     WHERE o.position > p.last_position AND o.position <= lim.final_position
     ORDER BY o.position
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    "position" := failed.position;
    event_type := failed.event_type;
    IF p.on_error = 'park' THEN
        INSERT INTO cqrs.parked (projection, position, event_type, outcome, error, sqlstate, attempts)
        VALUES (projection, failed.position, failed.event_type, 'parked', message, code, attempts)
        ON CONFLICT ON CONSTRAINT parked_pkey DO UPDATE
           SET outcome = 'parked', error = excluded.error, sqlstate = excluded.sqlstate,
               attempts = cqrs.parked.attempts + excluded.attempts, at = now(), retry = false;
        PERFORM cqrs._advance_checkpoint(projection, false, failed.position, 0, false,
                                         lim.final_position, lim.fence, NULL);
        outcome := 'parked';
        RETURN;
    END IF;
    UPDATE cqrs.projections c
       SET state = 'halted',
           failed_attempts = CASE WHEN c.failed_position = failed.position
                                  THEN c.failed_attempts + attempts ELSE attempts END,
           failed_position = failed.position,
           failed_error = message,
           failed_sqlstate = code,
           failed_at = now(),
           updated_at = now()
     WHERE c.name = projection;
    outcome := 'halted';
END
$$;

-- sql/cqrs/functions/retry_projection.sql
-- `cqrs-pg retry PROJECTION`: a halted projection runs again, trying its failing event
-- anew, and its parked events are queued for the daemon to apply again (cqrs.claim_parked).
-- Returns the event it was halted at (NULL: it was running) and how many parked events
-- were queued. CQ002 for an unknown projection; CQ003, changing nothing, when there is
-- nothing to retry.
CREATE OR REPLACE FUNCTION cqrs.retry_projection(projection text, OUT halted_at bigint, OUT queued integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR UPDATE;
    halted_at := p.failed_position;
    UPDATE cqrs.projections c
       SET state = 'running', failed_position = NULL, failed_error = NULL, failed_sqlstate = NULL,
           failed_attempts = NULL, failed_at = NULL, updated_at = now()
     WHERE c.name = projection AND c.state = 'halted';
    UPDATE cqrs.parked k SET retry = true
     WHERE k.projection = retry_projection.projection AND k.outcome = 'parked' AND NOT k.retry;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF halted_at IS NULL AND queued = 0 THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not halted and has no parked events to apply again: nothing to retry', projection));
    END IF;
    -- wake a sleeping daemon
    PERFORM pg_notify('cqrs_outbox', '');
END
$$;

-- sql/cqrs/functions/skip_event.sql
-- `cqrs-pg skip PROJECTION --position N`: a projection halted at event N records it as
-- skipped (cqrs.parked, outcome 'skipped', with the error it failed with) and goes on
-- after it. Only the event it is halted at can be skipped: CQ003, changing nothing, when
-- the projection is not halted or halted at another event; CQ002 for an unknown
-- projection. Waits for a daemon's batch of the projection in hand to commit.
CREATE OR REPLACE FUNCTION cqrs.skip_event(projection text, "position" bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    skipped cqrs.outbox;
BEGIN
    p := cqrs._projection(projection);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR UPDATE;
    IF p.state <> 'halted' THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not halted: only the event a halted projection stopped at can be skipped', projection));
    END IF;
    IF skip_event.position IS DISTINCT FROM p.failed_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is halted at event %s, not %s: only that event can be skipped',
            projection, p.failed_position, coalesce(skip_event.position::text, 'NULL')));
    END IF;
    SELECT * INTO skipped FROM cqrs.outbox o WHERE o.position = p.failed_position;
    INSERT INTO cqrs.parked (projection, position, event_type, outcome, error, sqlstate, attempts)
    VALUES (projection, p.failed_position, coalesce(skipped.event_type, '?'), 'skipped',
            p.failed_error, p.failed_sqlstate, p.failed_attempts)
    ON CONFLICT ON CONSTRAINT parked_pkey DO UPDATE
       SET outcome = 'skipped', error = excluded.error, sqlstate = excluded.sqlstate,
           attempts = excluded.attempts, at = now(), retry = false;
    PERFORM cqrs._advance_checkpoint(projection, false, p.failed_position, 0, false,
                                     p.final_position, cqrs._fence(pg_current_snapshot()), NULL);
    PERFORM pg_notify('cqrs_outbox', '');
END
$$;

-- sql/cqrs/functions/claim_parked.sql
-- Applying a parked event again (queued by cqrs.retry_projection), step 1 of 2, in one
-- transaction with cqrs.apply_parked: takes the projection's lock (busy when another
-- daemon holds it) and returns the first queued parked event's position (NULL: none) and
-- the search_path the projection's writes resolve in. For a python projection the daemon
-- then reads the event (cqrs.batch_events(projection, position - 1, position)) and runs
-- the handler before step 2.
CREATE OR REPLACE FUNCTION cqrs.claim_parked(projection text)
RETURNS TABLE ("position" bigint, busy boolean, search_path text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._lock('projection', projection, false) THEN
        RETURN QUERY SELECT NULL::bigint, true, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY
        SELECT min(k.position), false, p.search_path
          FROM cqrs.parked k
         WHERE k.projection = claim_parked.projection AND k.retry;
END
$$;

-- sql/cqrs/functions/apply_parked.sql
-- Applying a parked event again, step 2 of 2, in the transaction that claimed it
-- (cqrs.claim_parked): a sql projection's apply function runs over that one event (a
-- python projection's handler has run already); the event leaves cqrs.parked and counts as
-- applied. The checkpoint, long past the event, stays where it is.
CREATE OR REPLACE FUNCTION cqrs.apply_parked(projection text, "position" bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._holds_lock('projection', projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_parked first', projection));
    END IF;
    DELETE FROM cqrs.parked k
     WHERE k.projection = apply_parked.projection AND k.position = apply_parked.position AND k.retry;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format(
            'event %s of projection %L is not parked for another try', apply_parked.position, projection));
    END IF;
    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function, p.search_path, apply_parked.position - 1, apply_parked.position);
    END IF;
    UPDATE cqrs.projections c SET applied_events = c.applied_events + 1, updated_at = now() WHERE c.name = projection;
END
$$;

-- sql/cqrs/functions/parked_failed.sql
-- A parked event failed once more when applied again (cqrs.apply_parked rolled back): it
-- stays parked with the new error, no longer queued.
CREATE OR REPLACE FUNCTION cqrs.parked_failed(projection text, "position" bigint, error text, sqlstate text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE cqrs.parked k
       SET error = left(coalesce(parked_failed.error, 'unknown error'), 2000),
           sqlstate = left(parked_failed.sqlstate, 5),
           attempts = k.attempts + 1, at = now(), retry = false
     WHERE k.projection = parked_failed.projection AND k.position = parked_failed.position;
$$;

-- sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event up to the final position
-- (a sql projection, in batches of max_events; a python one's handler has done so earlier
-- in this transaction: cqrs.claim_batch with rebuild and final), then replaces each live table by
-- its shadow copy, grants included. Readers see the old tables until commit and the new
-- ones after: never an empty, half-built or older read model. Returns the number of
-- events the new tables were built from.
CREATE OR REPLACE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}'::regclass[];
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock('rebuild', projection, true);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    LOOP
        EXIT WHEN p.kind <> 'sql';
        SELECT * INTO b FROM cqrs._next_batch(r.last_position, lim.final_position, max_events);
        EXIT WHEN b.n = 0;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema), r.last_position, b.end_position);
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Swapped in, the shadow must hold every event the live tables hold, and perhaps more.
    IF r.last_position < p.last_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to position %s, the live tables up to %s: '
            'catch it up in this transaction first (cqrs.claim_batch with rebuild and final)',
            projection, r.last_position, p.last_position));
    END IF;

    FOREACH t IN ARRAY p.tables LOOP
        SELECT c.relname, n.nspname, c.relacl, c.relowner INTO tbl
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = t;
        old_indexes := ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid = t ORDER BY 1);
        EXECUTE format('DROP TABLE %s', t);
        EXECUTE format('ALTER TABLE %I.%I SET SCHEMA %I', r.shadow_schema, tbl.relname, tbl.nspname);
        fresh := format('%I.%I', tbl.nspname, tbl.relname)::regclass;
        FOR grant_ IN SELECT * FROM aclexplode(tbl.relacl) a WHERE a.grantee <> tbl.relowner LOOP
            -- the privilege as a keyword from a fixed list, never text from elsewhere
            EXECUTE format('GRANT %s ON %s TO %s',
                           CASE grant_.privilege_type
                               WHEN 'SELECT' THEN 'SELECT' WHEN 'INSERT' THEN 'INSERT'
                               WHEN 'UPDATE' THEN 'UPDATE' WHEN 'DELETE' THEN 'DELETE'
                               WHEN 'TRUNCATE' THEN 'TRUNCATE' WHEN 'REFERENCES' THEN 'REFERENCES'
                               WHEN 'TRIGGER' THEN 'TRIGGER' END,
                           fresh,
                           CASE WHEN grant_.grantee = 0 THEN 'PUBLIC'
                                ELSE quote_ident(pg_get_userbyid(grant_.grantee)) END);
        END LOOP;
        IF old_indexes IS DISTINCT FROM ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                               WHERE x.indrelid = fresh ORDER BY 1) THEN
            PERFORM cqrs._fail('CQ003', format(
                'rebuilding %s would rename its indexes (%s): give them the names PostgreSQL would choose',
                fresh, array_to_string(old_indexes, ', ')));
        END IF;
        swapped := swapped || fresh;
    END LOOP;
    EXECUTE format('DROP SCHEMA %I', r.shadow_schema);

    -- Every transaction below the new horizon is wholly in the shadow (cqrs._horizon).
    UPDATE cqrs.projections c
       SET last_position = r.last_position,
           applied_events = r.applied_events,
           horizon = greatest(c.horizon, cqrs._horizon(r.last_position, lim.fence)),
           final_position = greatest(c.final_position, r.final_position, lim.final_position),
           tables = swapped,
           updated_at = now(),
           -- the rebuild applied every event up to its checkpoint: a halt at one of them
           -- is over, and its parked and skipped events are in the new read model
           state = CASE WHEN r.last_position >= c.failed_position THEN 'running' ELSE c.state END,
           failed_position = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_position END,
           failed_error = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_error END,
           failed_sqlstate = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_sqlstate END,
           failed_attempts = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_attempts END,
           failed_at = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_at END
     WHERE c.name = projection;
    DELETE FROM cqrs.parked k WHERE k.projection = rebuild_finish.projection AND k.position <= r.last_position;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT SELECT ON cqrs.parked TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.projection_status(),
    cqrs.projection_failed(text, bigint, text, text, integer),
    cqrs.claim_parked(text),
    cqrs.apply_parked(text, bigint),
    cqrs.parked_failed(text, bigint, text, text)
TO cqrs_listener;
