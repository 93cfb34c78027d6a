-- sql/roles.sql
-- Group roles (NOLOGIN); deployers grant them to login users. Roles are cluster-wide, so
-- an install into a second database of the same cluster finds them already there.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['cqrs_writer', 'cqrs_reader', 'cqrs_listener'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;

-- sql/cqrs/schema.sql
-- The cqrs core: outbox, command receipts, projection checkpoints, wake-up doorbell.
CREATE SCHEMA cqrs;

-- sql/cqrs/types/receipt.sql
-- What every command returns: token is the command transaction's xid, for cqrs.caught_up().
CREATE TYPE cqrs.receipt AS (
    command_id   uuid,
    aggregate_id uuid,
    version      integer,
    token        bigint,
    duplicate    boolean
);

-- sql/cqrs/tables/outbox.sql
-- The append-only event log, written only by the capture triggers (cqrs.capture_changes) in the command's transaction.
-- position is taken at insert, not at commit, so readers never follow position alone:
-- they read in (tx_id, position) order below the xmin fence (see cqrs.run_projection).
CREATE TABLE cqrs.outbox (
    position          bigint GENERATED ALWAYS AS IDENTITY,
    tx_id             xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    event_type        text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      uuid NOT NULL,
    aggregate_version integer NOT NULL,
    payload           jsonb NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT outbox_pkey PRIMARY KEY (position)
);

CREATE INDEX outbox_tx_id_position ON cqrs.outbox (tx_id, position);

-- sql/cqrs/tables/commands.sql
-- One row per command that committed: makes a retried command_id return its first receipt.
CREATE TABLE cqrs.commands (
    command_id   uuid PRIMARY KEY,
    command      text NOT NULL,
    arguments    jsonb NOT NULL,
    aggregate_id uuid,
    version      integer,
    token        bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- sql/cqrs/indexes/commands_created_at.sql
-- For cqrs.prune_receipts: the oldest receipts without a scan of them all.
CREATE INDEX commands_created_at_idx ON cqrs.commands (created_at);

-- sql/cqrs/tables/projections.sql
-- One row per projection: its checkpoint, advanced in the same transaction as its
-- read-model writes, so the checkpoint replicates together with what it describes.
CREATE TABLE cqrs.projections (
    name           text PRIMARY KEY,
    kind           text NOT NULL,
    apply_function regproc,
    matview        regclass,
    -- matview: refresh only for these; python: the handler sees only these (NULL: all)
    event_types    text[],
    -- sql: the schemas its apply function finds its tables in, and the tables it owns
    -- (what cqrs-pg rebuild builds anew and swaps in); python: the schemas its handler's
    -- unqualified table names resolve in, and the tables it writes (what a rebuild copies
    -- and swaps in, as for sql)
    search_path    text,
    tables         regclass[],
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    -- every transaction with an xid below horizon is wholly applied (cqrs.caught_up)
    horizon        xid8 NOT NULL DEFAULT '0',
    applied_events bigint NOT NULL DEFAULT 0,
    refreshed_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT projections_kind CHECK (kind IN ('sql', 'matview', 'python')),
    CONSTRAINT projections_sql_has_function CHECK (kind <> 'sql' OR (apply_function IS NOT NULL AND search_path IS NOT NULL AND tables IS NOT NULL)),
    -- python: a handler registered by name in the daemon (cqrs_pg.projections.register)
    CONSTRAINT projections_python_has_search_path CHECK (kind <> 'python' OR search_path IS NOT NULL),
    CONSTRAINT projections_matview_has_view CHECK (kind <> 'matview' OR matview IS NOT NULL)
);

-- sql/cqrs/tables/listeners.sql
-- Running daemons. A row with sleeping = true asks the outbox trigger to ring the doorbell
-- (NOTIFY); while no daemon sleeps, commands skip NOTIFY and its commit-time lock.
-- expires_at lets a killed daemon's row stop costing commands anything.
CREATE TABLE cqrs.listeners (
    listener_id text PRIMARY KEY,
    pid         integer NOT NULL,
    sleeping    boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at  timestamptz NOT NULL
);

-- sql/cqrs/tables/rebuilds.sql
-- A rebuild in progress: the shadow schema its new tables grow in, and its own checkpoint.
CREATE TABLE cqrs.rebuilds (
    projection     text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE,
    shadow_schema  name NOT NULL,
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    applied_events bigint NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- sql/cqrs/functions/_fail.sql
-- Raises a cqrs error: errcode is one of the documented CQ00x SQLSTATEs.
-- VOLATILE on purpose: the planner evaluates an IMMUTABLE call with constant arguments
-- while planning, which would raise the error even in a CASE branch that never runs.
CREATE OR REPLACE FUNCTION cqrs._fail(errcode text, message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- @plpgsql_check_options: performance_warnings = false
    RAISE EXCEPTION USING ERRCODE = _fail.errcode, MESSAGE = _fail.message;
END
$$;

-- sql/cqrs/functions/_require_text.sql
-- Trims a text argument; CQ001 when it is null, blank, longer than max_length or holds a
-- control character. Trims Unicode spaces by name: [[:space:]] depends on the server's
-- locale (under C.UTF-8 it misses U+00A0), so a "name" of no-break spaces would pass.
CREATE OR REPLACE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := regexp_replace(
        value,
        '^[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+'
        '|[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+$',
        '', 'g');
    bad integer;
BEGIN
    IF trimmed IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF trimmed = '' THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be blank, got %L', argument, left(value, 40)));
    ELSIF length(trimmed) > max_length THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s characters, got %s: %L',
                                           argument, max_length, length(trimmed), left(trimmed, 40) || '...'));
    END IF;
    bad := regexp_instr(trimmed, '[\u0001-\u001f\u007f-\u009f]');
    IF bad > 0 THEN
        PERFORM cqrs._fail('CQ001', format('%s must not contain control characters, got U+%s at position %s: %L',
                                           argument, lpad(upper(to_hex(ascii(substr(trimmed, bad, 1)))), 4, '0'),
                                           bad, left(trimmed, 40)));
    END IF;
    RETURN trimmed;
END
$$;

-- sql/cqrs/functions/_require_range.sql
-- CQ001 unless min_value <= value (<= max_value when given); returns value.
CREATE FUNCTION cqrs._require_range(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF value < min_value THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at least %s, got %s', argument, min_value, value));
    ELSIF value > max_value THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s, got %s', argument, max_value, value));
    END IF;
    RETURN value;
END
$$;

-- sql/cqrs/functions/_require_id.sql
-- CQ001 when an id argument is null; returns it.
CREATE FUNCTION cqrs._require_id(argument text, value uuid)
RETURNS uuid
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    END IF;
    RETURN value;
END
$$;

-- sql/cqrs/functions/_check_version.sql
-- CQ004 when the caller named an expected_version and the row has another.
CREATE FUNCTION cqrs._check_version(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF expected_version IS NOT NULL AND expected_version <> actual_version THEN
        PERFORM cqrs._fail('CQ004', format('%s %s is at version %s, expected version %s',
                                           entity, id, actual_version, expected_version));
    END IF;
END
$$;

-- sql/cqrs/functions/_projection.sql
-- A projection's row; CQ002 naming it when there is none.
CREATE FUNCTION cqrs._projection(projection text)
RETURNS cqrs.projections
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('projection %L does not exist', projection));
    END IF;
    RETURN p;
END
$$;

-- sql/cqrs/functions/_begin_command.sql
-- Claims command_id for this transaction and tags its events with it. Returns the first
-- receipt (duplicate = true) if the same command with the same arguments already ran,
-- NULL if the caller should go on; CQ005 if the id was used for something else.
-- The receipt itself is written once, by cqrs._finish_command: until then an advisory
-- lock on the id makes a concurrent twin wait here, and when the first commits the twin's
-- next statement (a new snapshot, in READ COMMITTED) sees its receipt. If the first
-- aborts, the twin runs the command.
CREATE OR REPLACE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
BEGIN
    PERFORM cqrs._require_id('command_id', command_id);
    -- Key space 1668444017 is the commands' (1668444016 is the projections'). Two ids that
    -- share a hash only queue behind each other; the primary key keeps them apart.
    PERFORM pg_advisory_xact_lock(1668444017, hashtext(command_id::text));
    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _begin_command.command_id;
    IF NOT FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        PERFORM set_config('cqrs.arguments', arguments::text, true);
        RETURN NULL;
    END IF;

    IF prior.command <> command OR prior.arguments <> arguments THEN
        PERFORM cqrs._fail('CQ005', format('command_id %s was already used for %s(%s), not for %s(%s)',
                                           command_id, prior.command, left(prior.arguments::text, 200),
                                           command, left(arguments::text, 200)));
    END IF;
    RETURN ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
END
$$;

-- sql/cqrs/functions/_finish_command.sql
-- Records the command's receipt, for retries, and returns it: the one write of
-- cqrs.commands per command (cqrs._begin_command claimed the id and kept the command's
-- name and arguments for this). A conflict means a concurrent twin committed first and
-- this transaction could not see it (REPEATABLE READ or SERIALIZABLE): 40001, retry.
CREATE OR REPLACE FUNCTION cqrs._finish_command(command_id uuid, aggregate_id uuid, version integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    r cqrs.receipt;
BEGIN
    IF current_setting('cqrs.command_id', true) IS DISTINCT FROM command_id::text THEN
        RAISE EXCEPTION USING ERRCODE = 'assert_failure',  -- a bug in the command, not the caller's doing
            MESSAGE = format('cqrs._finish_command(%s) without cqrs._begin_command(%s) first', command_id, command_id);
    END IF;
    INSERT INTO cqrs.commands AS c (command_id, command, arguments, aggregate_id, version, token)
    VALUES (command_id, current_setting('cqrs.command'), current_setting('cqrs.arguments')::jsonb,
            aggregate_id, version, pg_current_xact_id()::text::bigint)
    ON CONFLICT ON CONSTRAINT commands_pkey DO NOTHING
    RETURNING c.command_id, c.aggregate_id, c.version, c.token, false INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = format('command_id %s was committed by a concurrent transaction that this one cannot see: retry',
                             command_id);
    END IF;
    RETURN r;
END
$$;

-- sql/cqrs/functions/_ring_doorbell.sql
-- The doorbell, rung by the outbox capture after each statement that appended events:
-- NOTIFY, but only while a daemon has said it is asleep (cqrs.listeners). A NOTIFY
-- serializes the commits of every notifying transaction in the cluster, so commands
-- under load, with the daemon awake, never send one (see DESIGN.md, wake-up).
-- A function of its own so that `cqrs-pg bench` can swap it for its baselines.
CREATE FUNCTION cqrs._ring_doorbell()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
END
$$;

-- sql/cqrs/functions/capture_changes.sql
-- Captures a table's changes in the outbox: for a table whose rows belong to an
-- aggregate, generates its own trigger function cqrs._capture_<schema>_<table>() and
-- attaches it AFTER INSERT, UPDATE and DELETE, statement level, with a transition table:
-- one INSERT into cqrs.outbox per statement, one event per changed row
-- (event_type = entity.created|updated|deleted, payload = the row as jsonb, metadata = the
-- command's id and name). The generated INSERT is static SQL, planned once per session;
-- a generic function running it through EXECUTE re-planned it on every statement
-- (measured: a sixth of a place_order). Calling it again for a table replaces both.
-- The triggers' arguments record this call's arguments (used by migration 0002).
CREATE OR REPLACE FUNCTION cqrs.capture_changes(
    tbl regclass,
    aggregate_type text,
    entity text,
    id_column name,
    version_column name DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn text;
    body text;
    op text;
    col name;
BEGIN
    aggregate_type := cqrs._require_text('aggregate_type', aggregate_type, 100);
    entity := cqrs._require_text('entity', entity, 100);
    IF tbl IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'tbl must not be null');
    END IF;
    FOREACH col IN ARRAY ARRAY[id_column, coalesce(version_column, id_column)] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped) THEN
            PERFORM cqrs._fail('CQ001', format('table %s has no column %L', tbl, col));
        END IF;
    END LOOP;

    SELECT '_capture_' || n.nspname || '_' || c.relname INTO fn
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = tbl;
    IF octet_length(fn) > 63 THEN  -- keep generated names distinct where PostgreSQL would truncate
        fn := left(fn, 50) || '_' || left(md5(fn), 12);
    END IF;
    fn := format('cqrs.%I', fn);

    body := format(
        $body$
DECLARE
    metadata jsonb := jsonb_strip_nulls(jsonb_build_object(
        'command_id', nullif(current_setting('cqrs.command_id', true), ''),
        'command', nullif(current_setting('cqrs.command', true), '')));
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
        SELECT %1$L, %4$L, r.%5$I, %6$s, to_jsonb(r), metadata FROM new_rows r;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
        SELECT %2$L, %4$L, r.%5$I, %6$s, to_jsonb(r), metadata FROM new_rows r;
    ELSE
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
        SELECT %3$L, %4$L, r.%5$I, %6$s, to_jsonb(r), metadata FROM old_rows r;
    END IF;
    PERFORM cqrs._ring_doorbell();
    RETURN NULL;
END
$body$,
        entity || '.created', entity || '.updated', entity || '.deleted', aggregate_type, id_column,
        CASE WHEN version_column IS NULL THEN '1' ELSE format('r.%I', version_column) END);

    EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql'
                   ' SET search_path = pg_catalog, pg_temp AS %L', fn, body);
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', fn);
    EXECUTE format('COMMENT ON FUNCTION %s() IS %L', fn,
                   format('Outbox capture for %s, generated by cqrs.capture_changes', tbl));
    FOREACH op IN ARRAY ARRAY['INSERT', 'UPDATE', 'DELETE'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', '_500_outbox_' || lower(op), tbl);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %s
             FOR EACH STATEMENT EXECUTE FUNCTION %s(%L, %L, %L, %L)',
            '_500_outbox_' || lower(op), op, tbl,
            CASE op WHEN 'DELETE' THEN 'OLD' ELSE 'NEW' END,
            CASE op WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END,
            fn, aggregate_type, entity, id_column, coalesce(version_column, ''));
    END LOOP;
END
$$;

-- sql/cqrs/functions/batch.sql
-- The events of one projection batch: those after the checkpoint up to and including
-- the batch end, in the order every projection applies them.
CREATE OR REPLACE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
       -- implied by the above; the planner estimates a batch's size from this, not from
       -- the row comparisons (a 5-event batch was estimated at 41,000 rows)
       AND o.tx_id BETWEEN from_tx AND to_tx
     ORDER BY o.tx_id, o.position;
$$;

-- sql/cqrs/functions/batch_unordered.sql
-- The events of cqrs.batch(), in no particular order: for set-based apply functions,
-- which group and aggregate the batch anyway and should not pay for a sort (measured: a
-- tenth of a shop projection's apply time). Inlined into the caller's query, like batch.
CREATE FUNCTION cqrs.batch_unordered(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
       -- implied by the above; the planner estimates a batch's size from this, not from
       -- the row comparisons (a 5-event batch was estimated at 41,000 rows)
       AND o.tx_id BETWEEN from_tx AND to_tx;
$$;

-- sql/cqrs/functions/_next_batch.sql
-- The end of the next batch after (from_tx, from_position) below the fence, and its size:
-- at most max_events events in (tx_id, position) order. NULLs and 0 when there is none.
-- plan_cache_mode: the one good plan is the index walk; a custom plan per call cost 0.2 ms
-- of planning on every poll of an idle projection (measured), more than the walk.
CREATE OR REPLACE FUNCTION cqrs._next_batch(
    from_tx xid8, from_position bigint, fence xid8, max_events integer,
    OUT end_tx xid8, OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- A full batch (the usual case in a catch-up) ends at the max_events-th event: one
    -- index-only walk, no count and no sort. Only a short batch is counted.
    SELECT o.tx_id, o.position
      INTO end_tx, end_position
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND o.tx_id < fence
     ORDER BY o.tx_id, o.position
    OFFSET max_events - 1
     LIMIT 1;
    IF FOUND THEN
        n := max_events::bigint;
        RETURN;
    END IF;
    WITH b AS (
        SELECT o.tx_id, o.position
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (from_tx, from_position)
           AND o.tx_id < fence
         ORDER BY o.tx_id, o.position
         LIMIT max_events)
    SELECT (SELECT count(*) FROM b), x.tx_id, x.position
      INTO n, end_tx, end_position
      FROM (SELECT b.tx_id, b.position FROM b ORDER BY b.tx_id DESC, b.position DESC LIMIT 1) x;
    n := coalesce(n, 0);
END
$$;

-- sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function over one batch, its unqualified table names
-- resolved through search_path: the projection's schemas, or a rebuild's shadow schema.
CREATE FUNCTION cqrs._apply_batch(
    apply_function regproc, search_path text,
    from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s($1, $2, $3, $4)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_tx, from_position, to_tx, to_position;
END
$$;

-- sql/cqrs/functions/_lock_projection.sql
-- The lock that lets one runner at a time apply a projection (cqrs.run_projection, and
-- cqrs.rebuild_finish while it swaps tables). An advisory lock, released at commit.
CREATE FUNCTION cqrs._lock_projection(projection text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(1668444016, hashtext(projection));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(1668444016, hashtext(projection));
END
$$;

-- sql/cqrs/functions/_holds_projection_lock.sql
-- Whether this session holds the lock of cqrs._lock_projection on the projection: a
-- python projection's batch may be read and completed only by the transaction that
-- claimed it (cqrs.claim_batch).
CREATE FUNCTION cqrs._holds_projection_lock(projection text)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM pg_locks l
         WHERE l.locktype = 'advisory'
           AND l.pid = pg_backend_pid()
           AND l.granted
           AND l.classid = 1668444016::oid
           AND l.objid = hashtext(projection)::oid
           AND l.objsubid = 2);
$$;

-- sql/cqrs/functions/_advance_checkpoint.sql
-- Moves a projection's checkpoint past a batch it has applied, in the caller's
-- transaction (the one that applied the batch): last_tx/last_position to the batch end,
-- applied_events by its size n, and the horizon (see cqrs.caught_up) to the fence, or only
-- to the batch's last tx_id when a full batch (full_batch) may have stopped inside that
-- transaction. refreshed: a matview refresh covered it. With to_tx NULL (nothing new below
-- the fence) only the horizon moves up, and only when the last batch may have ended inside
-- a transaction, so an idle daemon writes nothing (and takes no xid).
-- Shared by cqrs.run_projection (sql, matview) and cqrs.complete_batch (python).
CREATE FUNCTION cqrs._advance_checkpoint(
    projection text, to_tx xid8, to_position bigint, n bigint, fence xid8,
    full_batch boolean, refreshed boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    IF to_tx IS NULL THEN
        SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
        IF p.horizon <= p.last_tx AND p.horizon < fence THEN
            UPDATE cqrs.projections c SET horizon = fence, updated_at = now() WHERE c.name = projection;
        END IF;
        RETURN;
    END IF;
    UPDATE cqrs.projections c
       SET last_tx = to_tx,
           last_position = to_position,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, CASE WHEN full_batch THEN to_tx ELSE fence END),
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now()
     WHERE c.name = projection;
END
$$;

-- sql/cqrs/functions/caught_up.sql
-- True once the projection (NULL: every projection) has applied every event of the
-- transaction that returned token. Reads only cqrs.projections, which replicates with
-- the read tables, so it answers correctly on a streaming replica.
CREATE FUNCTION cqrs.caught_up(token bigint, projection text DEFAULT NULL)
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
           AND p.horizon <= token::text::xid8);
END
$$;

-- sql/cqrs/functions/register_projection.sql
-- Registers a projection: kind 'sql' applies batches with apply_function(from_tx,
-- from_position, to_tx, to_position), which finds its tables through search_path (a list
-- of schemas) and owns the tables listed in `tables`; kind 'matview' refreshes matview
-- CONCURRENTLY when events of event_types (NULL: any) arrive; kind 'python' is applied by
-- the daemon with a Python handler registered under the same name
-- (cqrs_pg.projections.register), its unqualified table names resolved through
-- search_path, seeing only events of event_types (NULL: all), writing the tables listed
-- in `tables` (what cqrs-pg rebuild rebuilds). A new projection starts
-- from the first event.
CREATE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables)
    VALUES (name, kind, apply_function, matview, event_types, search_path, tables);
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
-- Gap-free reading: events are read in (tx_id, position) order and only below the fence
-- pg_snapshot_xmin(pg_current_snapshot()): every transaction below it has ended, so no
-- event can later appear behind the checkpoint. A transaction that commits late is
-- delayed, never skipped. See sql/cqrs/DESIGN.md.
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
    fence xid8;
    n bigint := 0::bigint;
    end_tx xid8;
    end_pos bigint;
    relevant boolean;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a python projection: the daemon runs its handler (cqrs.claim_batch, cqrs.complete_batch)',
            projection));
    END IF;

    -- One runner per projection at a time, across daemons. An advisory lock rather than a
    -- row lock: checking an idle projection must not take an xid (that would hold back
    -- every fence) or write WAL. The lock is released only after our commit is visible,
    -- so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT 0::bigint, false, true, NULL::double precision;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    fence := pg_snapshot_xmin(pg_current_snapshot());

    IF p.kind = 'sql' THEN
        SELECT b.end_tx, b.end_position, b.n INTO end_tx, end_pos, n
          FROM cqrs._next_batch(p.last_tx, p.last_position, fence, max_events) b;
    ELSE
        SELECT o.tx_id, o.position
          INTO end_tx, end_pos
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
           AND o.tx_id < fence
         ORDER BY o.tx_id DESC, o.position DESC
         LIMIT 1;
    END IF;

    IF end_tx IS NULL THEN
        -- Nothing new below the fence: at most the horizon moves up.
        PERFORM cqrs._advance_checkpoint(projection, NULL, NULL, 0, fence, false, false);
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function, p.search_path, p.last_tx, p.last_position, end_tx, end_pos);
    ELSE
        SELECT EXISTS (
            SELECT 1
              FROM cqrs.outbox o
             WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
               AND (o.tx_id, o.position) <= (end_tx, end_pos)
               AND (p.event_types IS NULL OR o.event_type = ANY (p.event_types)))
          INTO relevant;
        IF relevant THEN
            IF p.refreshed_at > now() - refresh_interval THEN
                RETURN QUERY SELECT 0::bigint, false, false,
                    extract(epoch FROM p.refreshed_at + refresh_interval - now())::double precision;
                RETURN;
            END IF;
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview);
        END IF;
        -- the events of cqrs.batch(), counted from the index alone
        SELECT count(*) INTO n
          FROM cqrs.outbox o
         WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
           AND (o.tx_id, o.position) <= (end_tx, end_pos);
    END IF;

    -- a full sql batch may have stopped inside transaction end_tx
    PERFORM cqrs._advance_checkpoint(projection, end_tx, end_pos, n, fence,
                                     p.kind = 'sql' AND n >= max_events, coalesce(relevant, false));
    RETURN QUERY SELECT n, p.kind = 'sql' AND n >= max_events, false, NULL::double precision;
END
$$;

-- sql/cqrs/functions/claim_batch.sql
-- A python projection's daemon, step 1 of 3, in one transaction with the other two:
-- takes the projection's lock (busy: another daemon holds it; nothing else is returned)
-- and returns the next batch after the checkpoint below the fence, as cqrs.run_projection
-- finds it: from_tx/from_position (the checkpoint), to_tx/to_position (the batch end;
-- NULL when there is nothing to apply, n = 0) and the fence. The daemon then reads the
-- batch (cqrs.batch_events), lets the handler write, and calls cqrs.complete_batch.
CREATE FUNCTION cqrs.claim_batch(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (from_tx xid8, from_position bigint, to_tx xid8, to_position bigint, n bigint, fence xid8, busy boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    f xid8;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    -- the lock of cqrs.run_projection: released at commit, after our checkpoint is visible
    IF NOT cqrs._lock_projection(projection, false) THEN
        RETURN QUERY SELECT NULL::xid8, NULL::bigint, NULL::xid8, NULL::bigint, 0::bigint, NULL::xid8, true;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    f := pg_snapshot_xmin(pg_current_snapshot());
    SELECT * INTO b FROM cqrs._next_batch(p.last_tx, p.last_position, f, max_events);
    IF b.end_tx IS NULL THEN
        -- nothing new below the fence: at most the horizon moves up, as in run_projection
        PERFORM cqrs._advance_checkpoint(projection, NULL, NULL, 0, f, false, false);
    END IF;
    RETURN QUERY SELECT p.last_tx, p.last_position, b.end_tx, b.end_position, b.n, f, false;
END
$$;

-- sql/cqrs/functions/batch_events.sql
-- A python projection's daemon, step 2 of 3: the events of the batch it claimed with
-- cqrs.claim_batch in this transaction, in (tx_id, position) order, only those of the
-- projection's event_types (NULL: all). SECURITY DEFINER: the daemon's role needs no
-- access to cqrs.outbox itself.
CREATE FUNCTION cqrs.batch_events(
    projection text, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT cqrs._holds_projection_lock(projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.tx_id, b.position;
END
$$;

-- sql/cqrs/functions/complete_batch.sql
-- A python projection's daemon, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.claim_batch) and ran the handler: advances the checkpoint, applied_events and
-- horizon exactly as cqrs.run_projection does for a sql projection, so the handler's
-- writes and the checkpoint commit together. The arguments are claim_batch's answer; a
-- batch that does not start at the checkpoint, or a wrong count, is refused.
CREATE FUNCTION cqrs.complete_batch(
    projection text, to_tx xid8, to_position bigint, n bigint, fence xid8, max_events integer)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    counted bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    IF NOT cqrs._holds_projection_lock(projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    IF to_tx IS NULL OR to_position IS NULL OR fence IS NULL
       OR (to_tx, to_position) <= (p.last_tx, p.last_position)
       OR to_tx >= fence
       OR fence > pg_snapshot_xmin(pg_current_snapshot()) THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end (%s, %s) with fence %s is not after the checkpoint (%s, %s) of projection %L and below the fence',
            to_tx, to_position, fence, p.last_tx, p.last_position, projection));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position);
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    -- a full batch may have stopped inside transaction to_tx
    PERFORM cqrs._advance_checkpoint(projection, to_tx, to_position, n, fence, n >= max_events, false);
END
$$;

-- sql/cqrs/functions/rebuild_begin.sql
-- Starts (or starts over) a rebuild of a sql or python projection: empty copies of its
-- tables in a shadow schema, which its apply function (cqrs.rebuild_step) or its handler
-- (cqrs.rebuild_claim, cqrs.rebuild_events, cqrs.rebuild_complete) fills from the whole
-- event log while the daemon keeps the live tables current and readers keep reading them.
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
    -- one shadow schema holds a copy of each table
    SELECT c.relname INTO dup
      FROM unnest(p.tables) t_ JOIN pg_class c ON c.oid = t_
     GROUP BY c.relname HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L owns two tables named %I: a rebuild copies them into one shadow schema', projection, dup));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables LOOP
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t);
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
END
$$;

-- sql/cqrs/functions/rebuild_step.sql
-- Applies the next batch of the event log to a sql projection's rebuild's shadow tables,
-- below the fence, and advances the rebuild's own checkpoint. `more`: a full batch, call
-- again. (A python projection's handler applies its batches: cqrs.rebuild_claim.)
CREATE OR REPLACE FUNCTION cqrs.rebuild_step(projection text, max_events integer DEFAULT 10000)
RETURNS TABLE (applied bigint, more boolean)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_step.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    IF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s projection: its handler applies the batches of its rebuild '
            '(cqrs.rebuild_claim, cqrs.rebuild_events, cqrs.rebuild_complete)', projection, p.kind));
    END IF;
    SELECT * INTO b
      FROM cqrs._next_batch(r.last_tx, r.last_position, pg_snapshot_xmin(pg_current_snapshot()), max_events);
    IF b.end_tx IS NULL THEN
        RETURN QUERY SELECT 0::bigint, false;
        RETURN;
    END IF;
    PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                              r.last_tx, r.last_position, b.end_tx, b.end_position);
    UPDATE cqrs.rebuilds x
       SET last_tx = b.end_tx, last_position = b.end_position, applied_events = x.applied_events + b.n
     WHERE x.projection = rebuild_step.projection;
    RETURN QUERY SELECT b.n, b.n >= max_events;
END
$$;

-- sql/cqrs/functions/rebuild_claim.sql
-- A python projection's rebuild, step 1 of 3, in one transaction with cqrs.rebuild_events,
-- the handler's writes to the shadow tables and cqrs.rebuild_complete: the next batch
-- after the rebuild's checkpoint below the fence, as cqrs.rebuild_step finds it, and the
-- shadow schema that must be the handler's search_path. final: also take the projection's
-- lock, waiting for a daemon's batch, so the live tables stand still until this
-- transaction, which catches the shadow up and then calls cqrs.rebuild_finish, commits.
CREATE FUNCTION cqrs.rebuild_claim(projection text, max_events integer DEFAULT 10000, final boolean DEFAULT false)
RETURNS TABLE (from_tx xid8, from_position bigint, to_tx xid8, to_position bigint, n bigint, fence xid8,
               shadow_schema name)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    f xid8;
    b record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    -- the rebuild's row, then the projection's lock: the order of cqrs.rebuild_finish
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_claim.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF final THEN
        PERFORM cqrs._lock_projection(projection, true);
    END IF;
    f := pg_snapshot_xmin(pg_current_snapshot());
    SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, f, max_events);
    RETURN QUERY SELECT r.last_tx, r.last_position, b.end_tx, b.end_position, b.n, f, r.shadow_schema;
END
$$;

-- sql/cqrs/functions/rebuild_events.sql
-- A python projection's rebuild, step 2 of 3: the events of the batch cqrs.rebuild_claim
-- returned, in (tx_id, position) order, only those of the projection's event_types (NULL:
-- all), as cqrs.batch_events gives the daemon.
CREATE FUNCTION cqrs.rebuild_events(
    projection text, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.tx_id, b.position;
END
$$;

-- sql/cqrs/functions/rebuild_complete.sql
-- A python projection's rebuild, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.rebuild_claim) and let the handler write it to the shadow tables: moves the
-- rebuild's checkpoint past the batch. The arguments are rebuild_claim's answer; a batch
-- that is not after the checkpoint and below the fence, or a wrong count, is refused.
CREATE FUNCTION cqrs.rebuild_complete(projection text, to_tx xid8, to_position bigint, n bigint, fence xid8)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    counted bigint;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_complete.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF to_tx IS NULL OR to_position IS NULL OR fence IS NULL
       OR (to_tx, to_position) <= (r.last_tx, r.last_position)
       OR to_tx >= fence
       OR fence > pg_snapshot_xmin(pg_current_snapshot()) THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end (%s, %s) with fence %s is not after the checkpoint (%s, %s) of the rebuild of projection %L '
            'and below the fence', to_tx, to_position, fence, r.last_tx, r.last_position, projection));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (r.last_tx, r.last_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position);
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of the rebuild of projection %L holds %s events, not %s',
                                           projection, counted, n));
    END IF;
    UPDATE cqrs.rebuilds x
       SET last_tx = to_tx, last_position = to_position, applied_events = x.applied_events + n
     WHERE x.projection = rebuild_complete.projection;
END
$$;

-- sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event below the fence (a sql
-- projection, in batches of max_events; a python one's handler has done so earlier in
-- this transaction: cqrs.rebuild_claim with final), then replaces each live table by its
-- shadow copy, grants included. Readers see the old tables until commit and the new ones
-- after: never an empty, half-built or older read model. Returns the number of events the
-- new tables were built from.
CREATE OR REPLACE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    fence xid8;
    new_horizon xid8;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}'::regclass[];
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock_projection(projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    fence := pg_snapshot_xmin(pg_current_snapshot());
    LOOP
        EXIT WHEN p.kind <> 'sql';
        SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, fence, max_events);
        EXIT WHEN b.end_tx IS NULL;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                                  r.last_tx, r.last_position, b.end_tx, b.end_position);
        r.last_tx := b.end_tx;
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Swapped in, the shadow must hold every event the live tables hold, and perhaps more.
    IF (r.last_tx, r.last_position) < (p.last_tx, p.last_position) THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to (%s, %s), the live tables up to (%s, %s): '
            'catch it up in this transaction first (cqrs.rebuild_claim with final => true)',
            projection, r.last_tx, r.last_position, p.last_tx, p.last_position));
    END IF;
    -- Every transaction below the new horizon must be wholly in the shadow: the fence,
    -- unless a transaction below it has events after the shadow's checkpoint (one that
    -- ended after a python catch-up's last look; the daemon applies it after the swap).
    new_horizon := least(fence, (SELECT o.tx_id FROM cqrs.outbox o
                              WHERE (o.tx_id, o.position) > (r.last_tx, r.last_position) AND o.tx_id < fence
                              ORDER BY o.tx_id, o.position LIMIT 1));

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

    UPDATE cqrs.projections c
       SET last_tx = r.last_tx,
           last_position = r.last_position,
           applied_events = r.applied_events,
           horizon = greatest(c.horizon, new_horizon),
           tables = swapped,
           updated_at = now()
     WHERE c.name = projection;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- sql/cqrs/functions/listener_heartbeat.sql
-- A daemon says it is alive until now() + ttl, and whether it is about to sleep (then
-- commands ring the doorbell for it). Also forgets daemons that died long ago.
CREATE FUNCTION cqrs.listener_heartbeat(listener_id text, sleeping boolean, ttl interval)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM cqrs.listeners l WHERE l.expires_at < now() - interval '1 hour';
    INSERT INTO cqrs.listeners AS l (listener_id, pid, sleeping, expires_at)
    VALUES (listener_id, pg_backend_pid(), sleeping, now() + ttl)
    ON CONFLICT (listener_id) DO UPDATE
        SET pid = excluded.pid, sleeping = excluded.sleeping, expires_at = excluded.expires_at;
$$;

-- sql/cqrs/functions/listener_exit.sql
-- A daemon that stops cleanly removes its row, so commands stop ringing for it at once.
CREATE FUNCTION cqrs.listener_exit(listener_id text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM cqrs.listeners l WHERE l.listener_id = listener_exit.listener_id;
$$;

-- sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint, events not yet applied and the age of the oldest of them.
CREATE FUNCTION cqrs.projection_status()
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
    refreshed_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.name, p.kind, p.last_tx, p.last_position, p.horizon, p.applied_events,
           behind.n,
           coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           p.updated_at, p.refreshed_at
      FROM cqrs.projections p
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)) behind
     ORDER BY p.name;
$$;

-- sql/cqrs/functions/fence_blockers.sql
-- Open transactions that hold an xid, oldest first, in any database of the cluster:
-- each one holds every projection's fence back until it ends.
CREATE FUNCTION cqrs.fence_blockers()
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
    SELECT a.pid, a.datname, a.usename, a.application_name, a.state,
           a.backend_xid,
           a.xact_start, a.query_start,
           extract(epoch FROM clock_timestamp() - a.xact_start)::double precision,
           left(a.query, 200)
      FROM pg_stat_activity a
     WHERE a.backend_xid IS NOT NULL
       AND a.pid <> pg_backend_pid()
    UNION ALL
    SELECT NULL, x.database, x.owner, 'prepared transaction ' || x.gid, 'prepared',
           x.transaction, x.prepared, NULL,
           extract(epoch FROM clock_timestamp() - x.prepared)::double precision, NULL
      FROM pg_prepared_xacts x
     ORDER BY 9 DESC;
$$;

-- sql/cqrs/functions/fence_status.sql
-- The xmin fence now, and whether committed events wait above it (held back by an open
-- transaction): the daemon's stall watch. Reads only, so the caller takes no xid.
CREATE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence, EXISTS (SELECT 1 FROM cqrs.outbox o WHERE o.tx_id >= f.fence)
      FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS fence) f;
$$;

-- sql/cqrs/functions/prune_receipts.sql
-- Deletes up to max_rows receipts (cqrs.commands rows) older than older_than, oldest
-- first; returns how many it deleted. A retry of a pruned command_id runs the command
-- again, so keep receipts longer than any client retries. Call it until it returns 0, each
-- call in its own transaction: one huge DELETE would hold an xid, and with it every
-- projection (the xmin fence), for its whole duration.
CREATE FUNCTION cqrs.prune_receipts(older_than interval, max_rows integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
BEGIN
    IF older_than IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'older_than must not be null');
    ELSIF older_than < interval '0' THEN
        PERFORM cqrs._fail('CQ001', format('older_than must not be negative, got %s', older_than));
    END IF;
    PERFORM cqrs._require_range('max_rows', max_rows, 1, 1000000);

    DELETE FROM cqrs.commands c
     WHERE c.command_id IN (SELECT o.command_id
                              FROM cqrs.commands o
                             WHERE o.created_at < now() - older_than
                             ORDER BY o.created_at
                             LIMIT max_rows
                               FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- sql/cqrs/privileges.sql
-- Least privilege for the cqrs core: no function is executable by PUBLIC; each group role
-- gets only what its users need. SECURITY DEFINER functions do the rest as the owner.
-- An application's own grants (its commands to cqrs_writer, its read tables to
-- cqrs_reader) come after this, in its own privileges file (the shop's: sql/privileges.sql).
REVOKE ALL ON SCHEMA cqrs FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;

-- cqrs_writer: the receipt type that commands return (USAGE, no function, no table).
GRANT USAGE ON SCHEMA cqrs TO cqrs_writer;

-- cqrs_reader: read-your-writes.
GRANT USAGE ON SCHEMA cqrs TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.caught_up(bigint, text) TO cqrs_reader;

-- cqrs_listener: what the daemon calls, and the list of projections it runs. A python
-- projection's handler writes its tables as this role: grant those with the projection.
-- prune_receipts: an operator's cron job may run as the daemon's role.
GRANT USAGE ON SCHEMA cqrs TO cqrs_listener;
GRANT SELECT ON cqrs.projections TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.run_projection(text, integer, interval),
    cqrs.claim_batch(text, integer),
    cqrs.batch_events(text, xid8, bigint, xid8, bigint),
    cqrs.complete_batch(text, xid8, bigint, bigint, xid8, integer),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.projection_status(),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.caught_up(bigint, text),
    cqrs.prune_receipts(interval, integer)
TO cqrs_listener;
