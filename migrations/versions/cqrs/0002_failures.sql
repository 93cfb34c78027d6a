-- cqrs_0002: a projection's failure stops only that projection. Its policy (on_error:
-- halt or park), its state and the event it halted at live in cqrs.projections; events
-- set aside or skipped in cqrs.parked; the daemon reports failures with
-- cqrs.projection_failed and applies parked events again with cqrs.claim_parked and
-- cqrs.apply_parked; operators run cqrs.retry_projection and cqrs.skip_event.
-- A projection (and a rebuild) is held by a row lock, which only the engine's owner can
-- take, no longer by an advisory lock any login could take; cqrs.projection_status names
-- the session holding one. Diagnostics show a session's state and query only to a caller
-- who may see them (cqrs._may_see). cqrs.projections names functions and relations by
-- text, so that pg_dump / pg_restore and pg_upgrade carry it; transaction ids another
-- cluster stored (a logical restore) are rebased by cqrs.adopt_cluster. A rebuild carries
-- what deployers added to a table or refuses before it starts; a second one is refused, an
-- interrupted one shows (cqrs.rebuild_status) and is abandoned with cqrs.rebuild_abort.

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

-- Functions and relations by schema-qualified name: a logical restore loads this table
-- before it creates every view it could name, and pg_upgrade refuses a regproc column.
-- Printed with only pg_catalog on the search_path, every name is schema-qualified.
SELECT set_config('cqrs.saved_search_path', current_setting('search_path'), true);
SELECT set_config('search_path', 'pg_catalog', true);
ALTER TABLE cqrs.projections
    ALTER COLUMN apply_function TYPE text USING apply_function::text,
    ALTER COLUMN matview TYPE text USING matview::text,
    ALTER COLUMN tables TYPE text[] USING tables::text[];
SELECT set_config('search_path', current_setting('cqrs.saved_search_path'), true);

-- a rebuild records the session that began it: running or interrupted
ALTER TABLE cqrs.rebuilds ADD COLUMN pid integer, ADD COLUMN backend_start timestamptz;

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

-- sql/cqrs/functions/_text_problem.sql
-- What is wrong with a text argument, as a CQ001 message; NULL when nothing is. Wrong:
-- null, blank (once trimmed by cqrs._trim), longer than max_length as given (spaces
-- around it included: a command keeps its arguments as given in cqrs.commands, so no
-- padding may carry more than the bound there) or holding a control character. cqrs._require_text raises it; a command raises it itself, so that the
-- error's CONTEXT names only the command.
CREATE OR REPLACE FUNCTION cqrs._text_problem(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := cqrs._trim(value);
    bad integer;
BEGIN
    IF trimmed IS NULL THEN
        RETURN format('%s must not be null', argument);
    ELSIF trimmed = '' THEN
        RETURN format('%s must not be blank, got %L', argument, left(value, 40));
    ELSIF length(value) > max_length THEN
        RETURN format('%s must be at most %s characters, spaces around it included, got %s: %L',
                      argument, max_length, length(value), left(trimmed, 40) || '...');
    END IF;
    bad := regexp_instr(trimmed, '[\u0001-\u001f\u007f-\u009f]');
    IF bad > 0 THEN
        RETURN format('%s must not contain control characters, got U+%s at position %s: %L',
                      argument, lpad(upper(to_hex(ascii(substr(trimmed, bad, 1)))), 4, '0'),
                      bad, left(trimmed, 40));
    END IF;
    RETURN NULL;
END
$$;

-- sql/cqrs/functions/_lock_space.sql
-- The key spaces of the engine's advisory locks, named once: the first key of
-- pg_advisory_xact_lock(key1, key2); the second is the hash of what is locked.
--   command     a command_id's twin waits for the first (cqrs._begin_command)
-- (Projections and rebuilds are locked by row, cqrs._lock: an advisory key is open to
-- every login.)
-- No SET clause, so the planner inlines it and folds the constant.
CREATE OR REPLACE FUNCTION cqrs._lock_space(space text)
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE space WHEN 'command' THEN 1668444017 END;
$$;

-- sql/cqrs/functions/_lock.sql
-- Takes this transaction's lock on `name` in `space`, released at commit: waiting for it,
-- or (wait false) only if it is free. Returns whether it holds the lock.
--   projection  one runner at a time applies a projection (a daemon's batch, a swap): a
--               row lock on its row of cqrs.projections
--   rebuild     one transaction at a time fills a projection's rebuild: a row lock on its
--               row of cqrs.rebuilds
--   command     a command_id's twin waits for the first (cqrs._begin_command): an
--               advisory lock (cqrs._lock_space)
-- Row locks, because only a role that may UPDATE those tables (the engine's owner) can
-- take them: an advisory lock is open to every login, which could hold a projection's
-- and stop it. FOR NO KEY UPDATE leaves foreign keys to the row (cqrs.parked) free.
CREATE OR REPLACE FUNCTION cqrs._lock(space text, name text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF space = 'projection' THEN
        IF wait THEN
            PERFORM 1 FROM cqrs.projections c WHERE c.name = _lock.name FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM cqrs.projections c WHERE c.name = _lock.name FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        RETURN FOUND;
    ELSIF space = 'rebuild' THEN
        IF wait THEN
            PERFORM 1 FROM cqrs.rebuilds r WHERE r.projection = _lock.name FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM cqrs.rebuilds r WHERE r.projection = _lock.name FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        RETURN FOUND;
    ELSIF wait THEN
        PERFORM pg_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
END
$$;

-- sql/cqrs/functions/_holds_lock.sql
-- Whether this transaction holds the lock of cqrs._lock on `name` in `space` (projection
-- or rebuild): a batch may be read and completed only by the transaction that claimed it
-- (cqrs.claim_batch). It does when the row version it sees was locked (xmax) or written
-- (xmin) by this transaction or one of its subtransactions (a savepoint's): an xid whose
-- lock this backend holds until the transaction ends.
CREATE OR REPLACE FUNCTION cqrs._holds_lock(space text, name text)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM (SELECT c.xmin, c.xmax FROM cqrs.projections c
                 WHERE space = 'projection' AND c.name = _holds_lock.name
                 UNION ALL
                SELECT r.xmin, r.xmax FROM cqrs.rebuilds r
                 WHERE space = 'rebuild' AND r.projection = _holds_lock.name) x
          JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid IN (x.xmin, x.xmax)
         WHERE l.pid = pg_backend_pid() AND l.granted AND l.mode = 'ExclusiveLock');
$$;

-- sql/cqrs/functions/_may_see.sql
-- Whether the login calling a SECURITY DEFINER diagnostic may see what pg_stat_activity
-- shows only to members of a session's role or of pg_read_all_stats (its state, times and
-- query): such a function, run as the owner, must not show the caller more.
CREATE OR REPLACE FUNCTION cqrs._may_see(session_role oid)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT session_role IS NOT NULL
           AND (pg_has_role(session_user, session_role, 'USAGE')
                OR pg_has_role(session_user, 'pg_read_all_stats', 'USAGE'));
$$;

-- sql/cqrs/functions/listener_heartbeat.sql
-- A daemon says it is alive until now() + ttl, and whether it is about to sleep (then
-- commands ring the doorbell for it). Also forgets daemons that died long ago. Bounded,
-- since any login of cqrs_listener may call it: an id of at most 200 characters, a ttl
-- from 1 second to 1 day (a sleeping row costs every command a NOTIFY until it expires).
CREATE OR REPLACE FUNCTION cqrs.listener_heartbeat(listener_id text, sleeping boolean, ttl interval)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM cqrs._require_text('listener_id', listener_id, 200);
    IF ttl IS NULL OR ttl < interval '1 second' OR ttl > interval '1 day' THEN
        PERFORM cqrs._fail('CQ001', format('ttl must be from 1 second to 1 day, got %s', coalesce(ttl::text, 'NULL')));
    END IF;
    IF sleeping IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'sleeping must not be null');
    END IF;
    DELETE FROM cqrs.listeners l WHERE l.expires_at < now() - interval '1 hour';
    INSERT INTO cqrs.listeners AS l (listener_id, pid, sleeping, expires_at)
    VALUES (listener_id, pg_backend_pid(), sleeping, now() + ttl)
    ON CONFLICT ON CONSTRAINT listeners_pkey DO UPDATE
        SET pid = excluded.pid, sleeping = excluded.sleeping, expires_at = excluded.expires_at;
END
$$;

-- sql/cqrs/functions/_write_due.sql
-- Whether projection p, with nothing to apply, still has something to write: a mark that
-- lets the events committed meanwhile be read soon (cqrs._needs_mark), or a horizon its
-- last batch put off (cqrs._horizon). The rest of cqrs._read_limit's answer is given.
-- An idle projection without either writes nothing.
CREATE OR REPLACE FUNCTION cqrs._write_due(p cqrs.projections, final_position bigint, fence xid8,
                                           mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT cqrs._needs_mark(p.mark_xmax, final_position, fence, mark_position, pending_position)
        OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, fence, true) > p.horizon);
$$;

-- sql/cqrs/functions/_xids_moved.sql
-- Whether the engine holds transaction ids of another cluster's, ahead of this one's (a
-- logical restore: cqrs.adopt_cluster). A healthy cluster's stored ids are all below its
-- next xid. Reads the small tables only (as the owner: status runs it as the listener).
CREATE OR REPLACE FUNCTION cqrs._xids_moved()
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.projections c
                    WHERE c.horizon >= pg_snapshot_xmax(pg_current_snapshot())
                       OR c.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.rebuilds r WHERE r.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()));
$$;

-- sql/cqrs/functions/adopt_cluster.sql
-- After a logical dump and restore (pg_dump / pg_restore) into another cluster, the
-- transaction ids the engine stored — horizons, marks, receipts' tokens — are the old
-- cluster's. Where they are ahead of this cluster's (at or above its next xid), they would
-- say transactions not yet applied were (cqrs.caught_up) and hold marks that never become
-- usable. This rebases them: horizons back to the start (each recomputed at the next batch
-- or poll), those marks dropped, the old daemons' rows forgotten, old receipts' tokens to
-- one every horizon passes. Positions are untouched: reading goes on exactly where each
-- projection's checkpoint is, so no event is skipped or applied twice. Returns the rows
-- it changed (0: the ids had not moved). The daemon calls it as it connects; an operator
-- may call it at once after a restore.
CREATE OR REPLACE FUNCTION cqrs.adopt_cluster()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_xid xid8 := pg_snapshot_xmax(pg_current_snapshot());
    changed bigint := 0::bigint;
    n bigint;
BEGIN
    IF NOT cqrs._xids_moved() THEN
        RETURN 0::bigint;
    END IF;
    -- one adopter at a time; what a concurrent daemon changes meanwhile is rebased after it
    LOCK TABLE cqrs.projections IN SHARE ROW EXCLUSIVE MODE;
    UPDATE cqrs.projections c
       SET horizon = '3', horizon_position = 0,
           mark_xmax = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_xmax END,
           mark_position = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_position END,
           updated_at = now()
     WHERE c.horizon >= next_xid OR c.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.rebuilds r SET mark_xmax = NULL, mark_position = NULL WHERE r.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    DELETE FROM cqrs.listeners l WHERE l.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.commands m SET token = 3 WHERE m.token >= next_xid::text::bigint;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN changed + n;
END
$$;

-- sql/cqrs/functions/caught_up.sql
-- True once the projection (NULL: every projection) has applied every event of the
-- transaction that returned token. Reads only cqrs.projections, which replicates with
-- the read tables, so it answers correctly on a streaming replica. A horizon at or above
-- this cluster's next xid is another cluster's (a logical restore not yet adopted,
-- cqrs.adopt_cluster): it proves nothing, so the answer is false until then.
CREATE OR REPLACE FUNCTION cqrs.caught_up(token bigint, projection text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM cqrs._require_range('token', token, 0);
    IF projection IS NOT NULL THEN
        PERFORM cqrs._projection(projection);
    END IF;
    RETURN NOT EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE (projection IS NULL OR p.name = projection)
           AND (p.horizon <= token::text::xid8 OR p.horizon >= pg_snapshot_xmax(pg_current_snapshot())));
END
$$;

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
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables, on_error)
    VALUES (name, kind, apply_function::text, matview::text, event_types, search_path, tables::text[], on_error);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview';
END
$$;

-- sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint (and the transaction of the last event at or before it),
-- events not yet applied and the age of the oldest of them; its state ('running',
-- 'halted') with the event it halted at and the error, and its events set aside (parked,
-- skipped: cqrs.parked); and the session that holds it now (its row lock, cqrs._lock), if
-- any: normally a daemon applying a batch, else what stops it. Of that session, state and
-- seconds only when the caller's login may see them in pg_stat_activity.
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
    skipped bigint,
    held_by_pid integer,
    held_by_user name,
    held_by_application text,
    held_by_state text,
    held_seconds double precision)
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
           (SELECT count(*) FROM cqrs.parked k WHERE k.projection = p.name AND k.outcome = 'skipped'),
           holder.pid, holder.usename, holder.application_name,
           CASE WHEN cqrs._may_see(holder.usesysid) THEN holder.state END,
           CASE WHEN cqrs._may_see(holder.usesysid)
                THEN extract(epoch FROM clock_timestamp() - holder.xact_start)::double precision END
      FROM cqrs.projections p
      LEFT JOIN LATERAL (
           SELECT a.pid, a.usename, a.usesysid, a.application_name, a.state, a.xact_start
             FROM pg_stat_activity a
            WHERE a.backend_xid = p.xmax AND p.xmax <> '0'::xid
            LIMIT 1) holder ON true
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
        PERFORM cqrs._apply_batch(p.apply_function::regproc, p.search_path, apply_parked.position - 1, apply_parked.position);
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

-- sql/cqrs/functions/_rebuild_problem.sql
-- What keeps a rebuild from replacing table t by a new one, as a CQ003 message; NULL when
-- nothing does. The swap drops the old table: objects that depend on it (a view, a foreign
-- key from a table the projection does not own) would have to go with it, and a
-- publication's row filter or column list, or a partition hierarchy, is not carried over.
-- Everything else deployers add is (cqrs._table_extras).
CREATE OR REPLACE FUNCTION cqrs._rebuild_problem(projection text, t regclass, owned regclass[])
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('cannot rebuild projection %L: %s depends on its table %s; %s', projection, what, t, todo)
      FROM (
        SELECT format('%s %s', CASE v.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END, v.oid::regclass) AS what,
               'drop it before the rebuild and create it again after' AS todo
          FROM pg_depend d
          JOIN pg_rewrite w ON d.classid = 'pg_rewrite'::regclass AND w.oid = d.objid
          JOIN pg_class v ON v.oid = w.ev_class
         WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = t AND v.oid <> t
        UNION ALL
        SELECT format('the foreign key %I of %s', c.conname, c.conrelid::regclass),
               'drop it before the rebuild and add it again after'
          FROM pg_constraint c
         WHERE c.contype = 'f' AND c.confrelid = t AND c.conrelid <> ALL (owned)
        UNION ALL
        SELECT format('publication %I (with a row filter or column list)', pb.pubname),
               'drop the table from it before the rebuild and add it again after'
          FROM pg_publication_rel pr JOIN pg_publication pb ON pb.oid = pr.prpubid
         WHERE pr.prrelid = t AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)
        UNION ALL
        SELECT 'a partition or inheritance hierarchy', 'a partitioned or inherited table cannot be rebuilt'
          FROM pg_class c
         WHERE c.oid = t AND (c.relkind = 'p' OR c.relispartition
                              OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = t OR i.inhparent = t))
      ) problems
     LIMIT 1;
$$;

-- sql/cqrs/functions/_table_extras.sql
-- What deployers added to table t beyond its columns, constraints, indexes, storage
-- parameters and grants (which a rebuild's copy has already): its comment, row-level
-- security (enabled, forced) and policies, user triggers, publication membership and
-- replica identity, as the statements that add them to a table of the same name. A
-- rebuild reads them before it drops t and runs them on the new table once it has t's name.
CREATE OR REPLACE FUNCTION cqrs._table_extras(t regclass)
RETURNS text[]
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(statement ORDER BY ord, statement), '{}')
      FROM (
        SELECT 1 AS ord, format('COMMENT ON TABLE %s IS %L', t, d.description) AS statement
          FROM pg_description d
         WHERE d.classoid = 'pg_class'::regclass AND d.objoid = t AND d.objsubid = 0
        UNION ALL
        SELECT 2, format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t) FROM pg_class c WHERE c.oid = t AND c.relrowsecurity
        UNION ALL
        SELECT 2, format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t) FROM pg_class c WHERE c.oid = t AND c.relforcerowsecurity
        UNION ALL
        SELECT 3, format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', pol.polname, t,
                         CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                         CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                         WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                         (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                            FROM unnest(pol.polroles) r),
                         ' USING (' || pg_get_expr(pol.polqual, pol.polrelid) || ')',
                         ' WITH CHECK (' || pg_get_expr(pol.polwithcheck, pol.polrelid) || ')')
          FROM pg_policy pol
         WHERE pol.polrelid = t
        UNION ALL
        SELECT 4, pg_get_triggerdef(tg.oid) ||
                  CASE tg.tgenabled WHEN 'D' THEN format('; ALTER TABLE %s DISABLE TRIGGER %I', t, tg.tgname)
                                    WHEN 'R' THEN format('; ALTER TABLE %s ENABLE REPLICA TRIGGER %I', t, tg.tgname)
                                    WHEN 'A' THEN format('; ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t, tg.tgname)
                                    ELSE '' END
          FROM pg_trigger tg
         WHERE tg.tgrelid = t AND NOT tg.tgisinternal
        UNION ALL
        SELECT 5, format('ALTER PUBLICATION %I ADD TABLE %s', pb.pubname, t)
          FROM pg_publication_rel pr JOIN pg_publication pb ON pb.oid = pr.prpubid
         WHERE pr.prrelid = t
        UNION ALL
        SELECT 6, format('ALTER TABLE %s REPLICA IDENTITY %s', t,
                         CASE c.relreplident WHEN 'f' THEN 'FULL' WHEN 'n' THEN 'NOTHING'
                              ELSE format('USING INDEX %I', (SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                                             WHERE x.indrelid = t AND x.indisreplident)) END)
          FROM pg_class c
         WHERE c.oid = t AND c.relreplident IN ('f', 'n', 'i')
      ) extras;
$$;

-- sql/cqrs/functions/rebuild_status.sql
-- Rebuilds in progress or interrupted: running while the session that began it is alive
-- (a rebuild whose process died stays until it is abandoned, cqrs.rebuild_abort).
CREATE OR REPLACE FUNCTION cqrs.rebuild_status()
RETURNS TABLE (projection text, started_at timestamptz, last_position bigint, applied_events bigint,
               pid integer, running boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.projection, r.started_at, r.last_position, r.applied_events, r.pid,
           EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid AND a.backend_start = r.backend_start)
      FROM cqrs.rebuilds r
     ORDER BY r.projection;
$$;

-- sql/cqrs/functions/rebuild_begin.sql
-- Starts a rebuild of a sql or python projection: empty copies of its tables in a shadow
-- schema, which its apply function (cqrs.rebuild_step) or its handler (cqrs.claim_batch,
-- cqrs.batch_events, cqrs.complete_batch with rebuild) fills from the whole event log
-- while the daemon keeps the live tables current and readers keep reading them. Refused
-- (CQ003) while another rebuild of it is in progress or was interrupted (abandon that one
-- with cqrs.rebuild_abort), and when something the swap cannot carry depends on one of its
-- tables (cqrs._rebuild_problem).
CREATE OR REPLACE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := ('cqrs_rebuild_' || projection)::name;
    t regclass;
    dup name;
    running record;
    problem text;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    IF coalesce(cardinality(p.tables), 0) = 0 THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L names no tables (cqrs.projections.tables): there is nothing to rebuild', projection));
    END IF;
    SELECT * INTO running FROM cqrs.rebuild_status() x WHERE x.projection = rebuild_begin.projection;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', CASE WHEN running.running
            THEN format('a rebuild of projection %L is in progress (pid %s, since %s): wait for it to finish',
                        projection, running.pid, running.started_at)
            ELSE format('a rebuild of projection %L begun at %s was interrupted: abandon it first '
                        '(cqrs-pg rebuild --abort %s), then rebuild again', projection, running.started_at, projection)
            END);
    END IF;
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        problem := cqrs._rebuild_problem(projection, t, p.tables::regclass[]);
        IF problem IS NOT NULL THEN
            PERFORM cqrs._fail('CQ003', problem);
        END IF;
    END LOOP;
    -- one shadow schema holds a copy of each table
    SELECT c.relname INTO dup
      FROM unnest(p.tables::regclass[]) t_ JOIN pg_class c ON c.oid = t_
     GROUP BY c.relname HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L owns two tables named %I: a rebuild copies them into one shadow schema', projection, dup));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        -- LIKE copies columns, constraints and indexes, not storage parameters (fillfactor)
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)%s',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t,
                       (SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')
                          FROM pg_class c WHERE c.oid = t));
    END LOOP;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema, pid, backend_start)
    SELECT projection, shadow, pg_backend_pid(), a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();
END
$$;

-- sql/cqrs/functions/rebuild_step.sql
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

-- sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event up to the final position
-- (a sql projection, in batches of max_events; a python one's handler has done so earlier
-- in this transaction: cqrs.claim_batch with rebuild and final), then replaces each live table by
-- its shadow copy, grants included. Readers see the old tables until commit and the new
-- ones after: never an empty, half-built or older read model. What deployers added to a
-- table — comment, row-level security and policies, triggers, publications, replica
-- identity, sequences — goes over to its new table (cqrs._table_extras); what cannot
-- (cqrs._rebuild_problem) refuses the swap. Returns the number of events the new tables
-- were built from.
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
    shadow_t regclass;
    problem text;
    extras text[];
    statement text;
    seq record;
    identities text[];
    last_values bigint[];
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
        PERFORM cqrs._apply_batch(p.apply_function::regproc, quote_ident(r.shadow_schema), r.last_position, b.end_position);
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

    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        -- what depends on the old table, checked again: it may have come during the rebuild
        problem := cqrs._rebuild_problem(projection, t, p.tables::regclass[]);
        IF problem IS NOT NULL THEN
            PERFORM cqrs._fail('CQ003', problem);
        END IF;
        SELECT c.relname, n.nspname, c.relacl, c.relowner INTO tbl
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = t;
        shadow_t := format('%I.%I', r.shadow_schema, tbl.relname)::regclass;
        old_indexes := ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid = t ORDER BY 1);
        extras := cqrs._table_extras(t);
        -- A serial column's sequence goes over to the new table (its copy shares it); an
        -- identity column's new sequence goes on from the old one's last value.
        identities := '{}';
        last_values := '{}';
        FOR seq IN SELECT a.attname, a.attidentity, pg_get_serial_sequence(t::text, a.attname) AS name
                     FROM pg_attribute a
                    WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped
                      AND pg_get_serial_sequence(t::text, a.attname) IS NOT NULL LOOP
            IF seq.attidentity <> '' THEN
                identities := identities || seq.attname::text;
                last_values := last_values || pg_sequence_last_value(seq.name::regclass);
            ELSE
                EXECUTE format('ALTER SEQUENCE %s OWNED BY %s.%I', seq.name, shadow_t, seq.attname);
            END IF;
        END LOOP;
        EXECUTE format('DROP TABLE %s', t);
        EXECUTE format('ALTER TABLE %s SET SCHEMA %I', shadow_t, tbl.nspname);
        fresh := format('%I.%I', tbl.nspname, tbl.relname)::regclass;
        -- statements cqrs._table_extras built from the catalogs, every name and literal
        -- quoted by format(): no caller's text
        FOREACH statement IN ARRAY extras LOOP
            EXECUTE statement;
        END LOOP;
        FOR i IN 1 .. coalesce(cardinality(identities), 0) LOOP
            IF last_values[i] IS NOT NULL THEN
                PERFORM setval(pg_get_serial_sequence(fresh::text, identities[i]),
                               greatest(last_values[i],
                                        coalesce(pg_sequence_last_value(pg_get_serial_sequence(fresh::text, identities[i])::regclass), 0)));
            END IF;
        END LOOP;
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
           tables = swapped::text[],
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

-- sql/cqrs/functions/rebuild_abort.sql
-- Abandons a rebuild of projection: its shadow schema and its row go; the live tables are
-- untouched. Refused (CQ003) while another session that began it is still running it
-- (the session itself may: cqrs-pg rebuild abandons its own rebuild when it fails), CQ002
-- when there is none.
CREATE OR REPLACE FUNCTION cqrs.rebuild_abort(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM cqrs.rebuild_status() x WHERE x.projection = rebuild_abort.projection;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    ELSIF r.running AND r.pid <> pg_backend_pid() THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L is running (pid %s): stop it first (it leaves nothing live behind)',
            projection, r.pid));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE',
                   (SELECT x.shadow_schema FROM cqrs.rebuilds x WHERE x.projection = rebuild_abort.projection));
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_abort.projection;
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

-- sql/cqrs/functions/claim_batch.sql
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
        END IF;
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

-- sql/cqrs/functions/fence_blockers.sql
-- Open transactions that hold an xid, oldest xid first, in any database of the cluster:
-- each one holds every projection's fence back until it ends (a view's refresh, which the
-- fence leaves out, is not listed). Its state, times and query only where the caller's
-- login may see them in pg_stat_activity (cqrs._may_see): NULL elsewhere.
CREATE OR REPLACE FUNCTION cqrs.fence_blockers()
RETURNS TABLE (
    pid integer,
    database name,
    username name,
    application_name text,
    state text,
    xid xid,
    xact_start timestamptz,
    query_start timestamptz,
    seconds double precision,
    query text)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT u.* FROM (
    SELECT a.pid, a.datname, a.usename, a.application_name,
           CASE WHEN seen THEN a.state END,
           a.backend_xid,
           CASE WHEN seen THEN a.xact_start END, CASE WHEN seen THEN a.query_start END,
           CASE WHEN seen THEN extract(epoch FROM clock_timestamp() - a.xact_start)::double precision END,
           CASE WHEN seen THEN left(a.query, 200) END
      FROM pg_stat_activity a
     CROSS JOIN LATERAL cqrs._may_see(a.usesysid) seen
     WHERE a.backend_xid IS NOT NULL
       AND a.pid <> pg_backend_pid()
       AND NOT cqrs._left_out_of_fence(a.backend_xid)
    UNION ALL
    SELECT NULL, x.database, x.owner, 'prepared transaction ' || x.gid, 'prepared',
           x.transaction, x.prepared, NULL,
           extract(epoch FROM clock_timestamp() - x.prepared)::double precision, NULL
      FROM pg_prepared_xacts x) u
     ORDER BY age(u.backend_xid) DESC;
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT SELECT ON cqrs.parked TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.adopt_cluster(),
    cqrs._xids_moved(),
    cqrs.rebuild_status(),
    cqrs.projection_status(),
    cqrs.projection_failed(text, bigint, text, text, integer),
    cqrs.claim_parked(text),
    cqrs.apply_parked(text, bigint),
    cqrs.parked_failed(text, bigint, text, text)
TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0002';
