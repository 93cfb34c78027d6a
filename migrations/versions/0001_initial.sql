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
-- The append-only event log, written only by cqrs.tg_capture in the command's transaction.
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
    -- unqualified table names resolve in, and (informative) the tables it writes
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
CREATE FUNCTION cqrs._fail(errcode text, message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = _fail.errcode, MESSAGE = _fail.message;
END
$$;

-- sql/cqrs/functions/_require_text.sql
-- Trims a text argument (all leading and trailing whitespace, not just spaces); CQ001 when
-- it is null, blank or longer than max_length.
CREATE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := regexp_replace(value, '^[[:space:]]+|[[:space:]]+$', '', 'g');
BEGIN
    IF trimmed IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF trimmed = '' THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be blank, got %L', argument, value));
    ELSIF length(trimmed) > max_length THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s characters, got %s: %L',
                                           argument, max_length, length(trimmed), left(trimmed, 40) || '...'));
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
-- A concurrent twin waits on the primary key until the first commits or aborts.
CREATE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
BEGIN
    PERFORM cqrs._require_id('command_id', command_id);
    INSERT INTO cqrs.commands (command_id, command, arguments, token)
    VALUES (command_id, command, arguments, pg_current_xact_id()::text::bigint)
    ON CONFLICT ON CONSTRAINT commands_pkey DO NOTHING;
    IF FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        RETURN NULL;
    END IF;

    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _begin_command.command_id;
    IF prior.command <> command OR prior.arguments <> arguments THEN
        PERFORM cqrs._fail('CQ005', format('command_id %s was already used for %s(%s), not for %s(%s)',
                                           command_id, prior.command, prior.arguments, command, arguments));
    END IF;
    RETURN ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
END
$$;

-- sql/cqrs/functions/_finish_command.sql
-- Records the command's outcome for retries and returns its receipt.
CREATE FUNCTION cqrs._finish_command(command_id uuid, aggregate_id uuid, version integer)
RETURNS cqrs.receipt
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE cqrs.commands c
       SET aggregate_id = _finish_command.aggregate_id, version = _finish_command.version
     WHERE c.command_id = _finish_command.command_id
    RETURNING c.command_id, c.aggregate_id, c.version, c.token, false;
$$;

-- sql/cqrs/functions/tg_capture.sql
-- Statement-level outbox trigger: appends one event per changed row, in one INSERT, from
-- the transition table. Attached by cqrs.capture_changes(), whose arguments it receives:
-- TG_ARGV = aggregate_type, entity (event_type = entity.created|updated|deleted),
--           aggregate id column, aggregate version column ('' means version 1).
CREATE FUNCTION cqrs.tg_capture()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    metadata jsonb := jsonb_strip_nulls(jsonb_build_object(
        'command_id', nullif(current_setting('cqrs.command_id', true), ''),
        'command', nullif(current_setting('cqrs.command', true), '')));
BEGIN
    EXECUTE format(
        'INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
         SELECT $1, $2, r.%I, %s, to_jsonb(r), $3 FROM %I r',
        TG_ARGV[2],
        CASE WHEN TG_ARGV[3] = '' THEN '1' ELSE format('r.%I', TG_ARGV[3]) END,
        CASE TG_OP WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END)
    USING TG_ARGV[1] || '.' || CASE TG_OP WHEN 'INSERT' THEN 'created'
                                          WHEN 'UPDATE' THEN 'updated'
                                          ELSE 'deleted' END,
          TG_ARGV[0],
          metadata;

    -- The doorbell. Only while a daemon has said it is asleep: NOTIFY serializes the
    -- commits of every notifying transaction in the cluster.
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
    RETURN NULL;
END
$$;

-- sql/cqrs/functions/capture_changes.sql
-- Attaches the outbox triggers (one per INSERT/UPDATE/DELETE, statement level with a
-- transition table) to a table whose rows belong to an aggregate.
CREATE FUNCTION cqrs.capture_changes(
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
    op text;
BEGIN
    FOREACH op IN ARRAY ARRAY['INSERT', 'UPDATE', 'DELETE'] LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %s
             FOR EACH STATEMENT EXECUTE FUNCTION cqrs.tg_capture(%L, %L, %L, %L)',
            '_500_outbox_' || lower(op), op, tbl,
            CASE op WHEN 'DELETE' THEN 'OLD' ELSE 'NEW' END,
            CASE op WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END,
            aggregate_type, entity, id_column, coalesce(version_column, ''));
    END LOOP;
END
$$;

-- sql/cqrs/functions/batch.sql
-- The events of one projection batch: those after the checkpoint up to and including
-- the batch end, in the order every projection applies them.
CREATE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
     ORDER BY o.tx_id, o.position;
$$;

-- sql/cqrs/functions/_next_batch.sql
-- The end of the next batch after (from_tx, from_position) below the fence, and its size:
-- at most max_events events in (tx_id, position) order. NULLs and 0 when there is none.
CREATE FUNCTION cqrs._next_batch(
    from_tx xid8, from_position bigint, fence xid8, max_events integer,
    OUT end_tx xid8, OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
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
        n := max_events;
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
-- search_path, seeing only events of event_types (NULL: all). A new projection starts
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
CREATE FUNCTION cqrs.run_projection(
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
    n bigint := 0;
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
-- Starts (or starts over) a rebuild of a sql projection: empty copies of its tables in a
-- shadow schema, which cqrs.rebuild_step fills from the whole event log while the daemon
-- keeps the live tables current and readers keep reading them.
CREATE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := 'cqrs_rebuild_' || projection;
    t regclass;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a python projection: rebuilding one is not supported yet',
                                           projection));
    ELSIF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
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
-- Applies the next batch of the event log to a rebuild's shadow tables, below the fence,
-- and advances the rebuild's own checkpoint. `more`: a full batch, call again.
CREATE FUNCTION cqrs.rebuild_step(projection text, max_events integer DEFAULT 10000)
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

-- sql/cqrs/functions/rebuild_finish.sql
-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event below the fence, then
-- replaces each live table by its shadow copy, grants included. Readers see the old
-- tables until commit and the new ones after: never an empty or half-built read model.
-- Returns the number of events the new tables were built from.
CREATE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    fence xid8;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}';
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
        SELECT * INTO b FROM cqrs._next_batch(r.last_tx, r.last_position, fence, max_events);
        EXIT WHEN b.end_tx IS NULL;
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema),
                                  r.last_tx, r.last_position, b.end_tx, b.end_position);
        r.last_tx := b.end_tx;
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- The shadow has now applied every event below the fence: all the live tables have,
    -- and perhaps more.

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
            EXECUTE format('GRANT %s ON %s TO %s', grant_.privilege_type, fresh,
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
           horizon = greatest(c.horizon, fence),
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

-- sql/shop/schema.sql
-- The example domain's write model: normalized tables, private to the command functions.
CREATE SCHEMA shop;

-- sql/shop/tables/customers.sql
CREATE TABLE shop.customers (
    id         uuid PRIMARY KEY,
    email      text NOT NULL,
    name       text NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT customers_email_key UNIQUE (email),
    CONSTRAINT customers_email_lower CHECK (email = pg_catalog.lower(email COLLATE "und-x-icu")),
    CONSTRAINT customers_version_positive CHECK (version >= 1)
);

-- sql/shop/tables/products.sql
CREATE TABLE shop.products (
    id          uuid PRIMARY KEY,
    sku         text NOT NULL,
    name        text NOT NULL,
    price_cents bigint NOT NULL,
    stock       integer NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT products_sku_key UNIQUE (sku),
    CONSTRAINT products_price_not_negative CHECK (price_cents >= 0),
    CONSTRAINT products_stock_not_negative CHECK (stock >= 0),
    CONSTRAINT products_version_positive CHECK (version >= 1)
);

-- sql/shop/tables/orders.sql
CREATE TABLE shop.orders (
    id          uuid PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES shop.customers (id),
    status      text NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    version     integer NOT NULL DEFAULT 1,
    CONSTRAINT orders_status CHECK (status IN ('placed', 'cancelled', 'shipped')),
    CONSTRAINT orders_version_positive CHECK (version >= 1)
);

-- sql/shop/tables/order_lines.sql
CREATE TABLE shop.order_lines (
    order_id         uuid NOT NULL REFERENCES shop.orders (id),
    line_no          integer NOT NULL,
    product_id       uuid NOT NULL REFERENCES shop.products (id),
    quantity         integer NOT NULL,
    unit_price_cents bigint NOT NULL,
    CONSTRAINT order_lines_pkey PRIMARY KEY (order_id, line_no),
    CONSTRAINT order_lines_quantity_positive CHECK (quantity > 0),
    CONSTRAINT order_lines_price_not_negative CHECK (unit_price_cents >= 0)
);

-- sql/shop/triggers/outbox.sql
-- Every change to the write model appends events to cqrs.outbox in the same transaction.
-- Order lines belong to their order's aggregate; they are only ever added with version 1.
SELECT cqrs.capture_changes('shop.customers', 'customer', 'customer', 'id', 'version');
SELECT cqrs.capture_changes('shop.products', 'product', 'product', 'id', 'version');
SELECT cqrs.capture_changes('shop.orders', 'order', 'order', 'id', 'version');
SELECT cqrs.capture_changes('shop.order_lines', 'order', 'order_line', 'order_id');

-- sql/shop/functions/_normalize_email.sql
-- Trims and lower-cases an email address; CQ001 unless it looks like local@domain.tld.
-- Lower-cased with ICU's root collation, so the result does not depend on the database's
-- locale (lower() under locale C leaves non-ASCII letters alone).
CREATE FUNCTION shop._normalize_email(email text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    normalized text := lower(cqrs._require_text('email', email, 320) COLLATE "und-x-icu");
BEGIN
    IF normalized !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
        PERFORM cqrs._fail('CQ001', format('email is not a valid address: %L', email));
    END IF;
    RETURN normalized;
END
$$;

-- sql/shop/functions/_parse_order_lines.sql
-- Validates place_order's lines: a JSON array of 1 to 100 {"sku": text, "quantity": integer > 0},
-- each sku once. Returns them as two arrays in line order; CQ001 naming the first bad entry.
CREATE FUNCTION shop._parse_order_lines(lines jsonb, OUT skus text[], OUT quantities integer[])
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    line jsonb;
    i integer := 0;
    sku text;
    quantity numeric;
BEGIN
    IF lines IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'lines must not be null');
    ELSIF jsonb_typeof(lines) <> 'array' THEN
        PERFORM cqrs._fail('CQ001', format('lines must be a JSON array, got %s: %s',
                                           jsonb_typeof(lines), left(lines::text, 80)));
    ELSIF jsonb_array_length(lines) NOT BETWEEN 1 AND 100 THEN
        PERFORM cqrs._fail('CQ001', format('lines must hold 1 to 100 entries, got %s',
                                           jsonb_array_length(lines)));
    END IF;

    skus := '{}';
    quantities := '{}';
    FOR line IN SELECT value FROM jsonb_array_elements(lines) LOOP
        i := i + 1;
        IF jsonb_typeof(line) <> 'object' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s] must be an object, got %s', i, left(line::text, 80)));
        ELSIF jsonb_typeof(line -> 'sku') IS DISTINCT FROM 'string' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].sku must be a string, got %s',
                                               i, coalesce(left((line -> 'sku')::text, 80), 'nothing')));
        ELSIF jsonb_typeof(line -> 'quantity') IS DISTINCT FROM 'number' THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].quantity must be a number, got %s',
                                               i, coalesce(left((line -> 'quantity')::text, 80), 'nothing')));
        END IF;
        sku := cqrs._require_text(format('lines[%s].sku', i), line ->> 'sku', 100);
        quantity := (line -> 'quantity')::numeric;
        IF quantity <> trunc(quantity) OR quantity < 1 OR quantity > 2147483647 THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].quantity must be a whole number from 1 to 2147483647, got %s',
                                               i, quantity));
        ELSIF sku = ANY (skus) THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s]: sku %L appears more than once', i, sku));
        END IF;
        skus := skus || sku;
        quantities := quantities || quantity::integer;
    END LOOP;
END
$$;

-- sql/shop/functions/_close_order.sql
-- Moves a placed order to its final status (cancelled gives the stock back). Shared by
-- cancel_order and ship_order, which differ only in the status they set.
CREATE FUNCTION shop._close_order(command text, command_id uuid, order_id uuid, expected_version integer, new_status text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('order_id', order_id);
    r := cqrs._begin_command(command_id, command,
                             jsonb_build_object('order_id', order_id, 'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    SELECT o.status, o.version INTO v_status, v_version
      FROM shop.orders o
     WHERE o.id = _close_order.order_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('order %s does not exist', order_id));
    END IF;
    PERFORM cqrs._check_version('order', order_id, expected_version, v_version);
    IF v_status <> 'placed' THEN
        PERFORM cqrs._fail('CQ003', format('order %s is %s: only a placed order can be %s',
                                           order_id, v_status, new_status));
    END IF;

    IF new_status = 'cancelled' THEN
        PERFORM 1
          FROM shop.products p
         WHERE p.id IN (SELECT l.product_id FROM shop.order_lines l WHERE l.order_id = _close_order.order_id)
         ORDER BY p.id
           FOR NO KEY UPDATE;
        UPDATE shop.products p
           SET stock = p.stock + l.quantity, version = p.version + 1
          FROM shop.order_lines l
         WHERE l.order_id = _close_order.order_id
           AND p.id = l.product_id;
    END IF;

    UPDATE shop.orders o
       SET status = new_status, updated_at = now(), version = o.version + 1
     WHERE o.id = _close_order.order_id
    RETURNING o.version INTO v_version;
    RETURN cqrs._finish_command(command_id, order_id, v_version);
END
$$;

-- sql/shop/functions/register_customer.sql
-- Registers a customer under a unique (case-insensitive) email address.
CREATE FUNCTION shop.register_customer(command_id uuid, email text, name text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_email text := shop._normalize_email(email);
    v_name text := cqrs._require_text('name', name, 200);
    v_id uuid := gen_random_uuid();
    r cqrs.receipt;
BEGIN
    r := cqrs._begin_command(command_id, 'register_customer',
                             jsonb_build_object('email', email, 'name', name));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    INSERT INTO shop.customers (id, email, name)
    VALUES (v_id, v_email, v_name)
    ON CONFLICT ON CONSTRAINT customers_email_key DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format('email %L is already registered', v_email));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/rename_customer.sql
-- Gives a customer a new name.
CREATE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := cqrs._require_text('name', name, 200);
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('customer_id', customer_id);
    r := cqrs._begin_command(command_id, 'rename_customer',
                             jsonb_build_object('customer_id', customer_id, 'name', name,
                                                'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    -- NO KEY UPDATE: does not block orders whose foreign key check locks this customer.
    SELECT c.version INTO v_version
      FROM shop.customers c
     WHERE c.id = rename_customer.customer_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('customer %s does not exist', customer_id));
    END IF;
    PERFORM cqrs._check_version('customer', customer_id, expected_version, v_version);

    UPDATE shop.customers c
       SET name = v_name, version = c.version + 1
     WHERE c.id = rename_customer.customer_id
    RETURNING c.version INTO v_version;
    RETURN cqrs._finish_command(command_id, customer_id, v_version);
END
$$;

-- sql/shop/functions/add_product.sql
-- Adds a product to the catalogue under a unique sku.
CREATE FUNCTION shop.add_product(command_id uuid, sku text, name text, price_cents bigint, initial_stock integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_name text := cqrs._require_text('name', name, 200);
    v_id uuid := gen_random_uuid();
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('price_cents', price_cents, 0);
    PERFORM cqrs._require_range('initial_stock', initial_stock, 0);
    r := cqrs._begin_command(command_id, 'add_product',
                             jsonb_build_object('sku', sku, 'name', name, 'price_cents', price_cents,
                                                'initial_stock', initial_stock));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    INSERT INTO shop.products (id, sku, name, price_cents, stock)
    VALUES (v_id, v_sku, v_name, price_cents, initial_stock)
    ON CONFLICT ON CONSTRAINT products_sku_key DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format('sku %L is already taken', v_sku));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/restock.sql
-- Adds quantity units to a product's stock.
CREATE FUNCTION shop.restock(command_id uuid, sku text, quantity integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_id uuid;
    v_stock integer;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('quantity', quantity, 1);
    r := cqrs._begin_command(command_id, 'restock',
                             jsonb_build_object('sku', sku, 'quantity', quantity));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    SELECT p.id, p.stock INTO v_id, v_stock
      FROM shop.products p
     WHERE p.sku = v_sku
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', v_sku));
    END IF;
    IF v_stock > 2147483647 - quantity THEN
        PERFORM cqrs._fail('CQ003', format('stock of sku %L would exceed 2147483647 (%s + %s)',
                                           v_sku, v_stock, quantity));
    END IF;

    UPDATE shop.products p
       SET stock = p.stock + quantity, version = p.version + 1
     WHERE p.id = v_id
    RETURNING p.version INTO v_version;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;

-- sql/shop/functions/change_price.sql
-- Sets the price that future orders of a product capture.
CREATE FUNCTION shop.change_price(command_id uuid, sku text, price_cents bigint)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_id uuid;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('price_cents', price_cents, 0);
    r := cqrs._begin_command(command_id, 'change_price',
                             jsonb_build_object('sku', sku, 'price_cents', price_cents));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    UPDATE shop.products p
       SET price_cents = change_price.price_cents, version = p.version + 1
     WHERE p.sku = v_sku
    RETURNING p.id, p.version INTO v_id, v_version;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', v_sku));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;

-- sql/shop/functions/place_order.sql
-- Places an order: takes the stock of every line and captures each product's current price.
CREATE FUNCTION shop.place_order(command_id uuid, customer_id uuid, lines jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parsed record;
    v_id uuid := gen_random_uuid();
    missing text;
    short record;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('customer_id', customer_id);
    SELECT * INTO parsed FROM shop._parse_order_lines(lines);
    r := cqrs._begin_command(command_id, 'place_order',
                             jsonb_build_object('customer_id', customer_id, 'lines', lines));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM shop.customers c WHERE c.id = place_order.customer_id) THEN
        PERFORM cqrs._fail('CQ002', format('customer %s does not exist', customer_id));
    END IF;

    -- Lock the products in id order, as every command does, so two orders never deadlock.
    PERFORM 1 FROM shop.products p WHERE p.sku = ANY (parsed.skus) ORDER BY p.id FOR NO KEY UPDATE;

    SELECT l.sku INTO missing
      FROM unnest(parsed.skus) WITH ORDINALITY AS l(sku, line_no)
     WHERE NOT EXISTS (SELECT 1 FROM shop.products p WHERE p.sku = l.sku)
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', missing));
    END IF;

    SELECT p.sku, p.stock, l.quantity INTO short
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     WHERE p.stock < l.quantity
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', format('not enough stock of sku %L: %s ordered, %s in stock',
                                           short.sku, short.quantity, short.stock));
    END IF;

    UPDATE shop.products p
       SET stock = p.stock - l.quantity, version = p.version + 1
      FROM unnest(parsed.skus, parsed.quantities) AS l(sku, quantity)
     WHERE p.sku = l.sku;

    INSERT INTO shop.orders (id, customer_id, status)
    VALUES (v_id, customer_id, 'placed');

    INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
    SELECT v_id, l.line_no, p.id, l.quantity, p.price_cents
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     ORDER BY l.line_no;

    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/cancel_order.sql
-- Cancels a placed order and gives its stock back.
CREATE FUNCTION shop.cancel_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM shop._close_order('cancel_order', command_id, order_id, expected_version, 'cancelled');
$$;

-- sql/shop/functions/ship_order.sql
-- Ships a placed order.
CREATE FUNCTION shop.ship_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM shop._close_order('ship_order', command_id, order_id, expected_version, 'shipped');
$$;

-- sql/shop_read/schema.sql
-- The read model: denormalized tables kept by the daemon, and a materialized view it
-- refreshes. Readable by cqrs_reader, typically on a streaming replica.
CREATE SCHEMA shop_read;

-- sql/shop_read/tables/order_summary.sql
-- One row per order with its totals and its customer's current name and email.
CREATE TABLE shop_read.order_summary (
    order_id       uuid PRIMARY KEY,
    customer_id    uuid NOT NULL,
    customer_name  text,
    customer_email text,
    status         text NOT NULL,
    line_count     integer NOT NULL DEFAULT 0,
    item_count     bigint NOT NULL DEFAULT 0,
    total_cents    bigint NOT NULL DEFAULT 0,
    placed_at      timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    version        integer NOT NULL
);

-- named as PostgreSQL would name it, so that a rebuild's copy (LIKE ... INCLUDING ALL)
-- gets the same name
CREATE INDEX order_summary_customer_id_idx ON shop_read.order_summary (customer_id);

-- sql/shop_read/tables/customer_stats.sql
-- One row per customer: orders placed, cancelled and shipped, and the value of orders
-- not cancelled.
CREATE TABLE shop_read.customer_stats (
    customer_id          uuid PRIMARY KEY,
    name                 text NOT NULL,
    email                text NOT NULL,
    orders_placed        bigint NOT NULL DEFAULT 0,
    orders_cancelled     bigint NOT NULL DEFAULT 0,
    orders_shipped       bigint NOT NULL DEFAULT 0,
    lifetime_value_cents bigint NOT NULL DEFAULT 0
);

-- sql/shop_read/views/product_sales.sql
-- One row per product: units sold and revenue over lines of orders not cancelled.
-- Refreshed CONCURRENTLY by the daemon, which needs the unique index on product_id.
CREATE MATERIALIZED VIEW shop_read.product_sales AS
SELECT p.id AS product_id,
       p.sku,
       p.name,
       p.price_cents,
       p.stock,
       coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS units_sold,
       coalesce(sum(l.quantity * l.unit_price_cents) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS revenue_cents
  FROM shop.products p
  LEFT JOIN shop.order_lines l ON l.product_id = p.id
  LEFT JOIN shop.orders o ON o.id = l.order_id
 GROUP BY p.id;

CREATE UNIQUE INDEX product_sales_product_id ON shop_read.product_sales (product_id);

-- sql/shop_proj/schema.sql
-- How the shop's projections turn events into shop_read rows: their apply functions and
-- the private state they keep (latest versions seen), never exposed to readers.
CREATE SCHEMA shop_proj;

-- sql/shop_proj/tables/order_summary_customers.sql
-- order_summary's copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.order_summary_customers (
    customer_id uuid PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    version     integer NOT NULL
);

-- sql/shop_proj/tables/customer_stats_customers.sql
-- customer_stats' copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.customer_stats_customers (LIKE shop_proj.order_summary_customers INCLUDING ALL);

-- sql/shop_proj/tables/customer_stats_orders.sql
-- customer_stats' view of each order: its latest status (by version) and its total.
CREATE TABLE shop_proj.customer_stats_orders (
    order_id    uuid PRIMARY KEY,
    customer_id uuid NOT NULL,
    status      text NOT NULL,
    total_cents bigint NOT NULL DEFAULT 0,
    version     integer NOT NULL
);

-- named as PostgreSQL would name it (see shop_read/tables/order_summary.sql)
CREATE INDEX customer_stats_orders_customer_id_idx ON shop_proj.customer_stats_orders (customer_id);

-- sql/shop_proj/functions/apply_order_summary.sql
-- Applies one batch of events to order_summary, set-based, in two statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy and their orders renamed;
-- 2. per order in the batch, one group holds its latest state and its new lines, so an
--    order's row is written once: upserted with its state (applied only over an older
--    version) plus its lines, or, lines only, updated.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE FUNCTION shop_proj.apply_order_summary(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC),
    cu AS (
        INSERT INTO order_summary_customers AS c (customer_id, name, email, version)
        SELECT bc.customer_id, bc.name, bc.email, bc.version FROM bc
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id, c.name, c.email)
    -- Orders placed before their customer's event was applied get the name here too.
    UPDATE order_summary s
       SET customer_name = cu.name, customer_email = cu.email
      FROM cu
     WHERE s.customer_id = cu.customer_id
       AND (s.customer_name, s.customer_email) IS DISTINCT FROM (cu.name, cu.email);

    WITH o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg(e.payload ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS state,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               count(*) FILTER (WHERE e.event_type = 'order_line.created') AS line_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS item_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- Lines arrive once each, after their order's row (same transaction, later position).
    os AS (
        INSERT INTO order_summary AS s
               (order_id, customer_id, customer_name, customer_email, status, line_count, item_count, total_cents,
                placed_at, updated_at, version)
        SELECT o.order_id, (o.state ->> 'customer_id')::uuid, c.name, c.email, o.state ->> 'status',
               o.line_count, o.item_count, o.total_cents,
               (o.state ->> 'placed_at')::timestamptz, (o.state ->> 'updated_at')::timestamptz,
               o.version
          FROM o
          LEFT JOIN order_summary_customers c ON c.customer_id = (o.state ->> 'customer_id')::uuid
         WHERE o.state IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               updated_at = CASE WHEN s.version < excluded.version THEN excluded.updated_at ELSE s.updated_at END,
               version = greatest(s.version, excluded.version),
               line_count = s.line_count + excluded.line_count,
               item_count = s.item_count + excluded.item_count,
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.line_count <> 0)
    UPDATE order_summary s
       SET line_count = s.line_count + o.line_count,
           item_count = s.item_count + o.item_count,
           total_cents = s.total_cents + o.total_cents
      FROM o
     WHERE s.order_id = o.order_id
       AND o.state IS NULL;
END
$$;

-- sql/shop_proj/functions/apply_customer_stats.sql
-- Applies one batch of events to customer_stats. One statement reads the batch
-- once and updates the private customer and order state (version-guarded; per order, one
-- group holds its latest state and its new lines, so its row is written once), returning
-- the customers whose private state changed; a second recomputes the rows of only those
-- customers, writing only rows whose values differ.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE FUNCTION shop_proj.apply_customer_stats(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    touched uuid[];
BEGIN
    WITH e AS MATERIALIZED (
        SELECT e.event_type, e.aggregate_id, e.aggregate_version, e.payload
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated', 'order.created', 'order.updated',
                                'order_line.created')),
    cu AS (
        INSERT INTO customer_stats_customers AS c (customer_id, name, email, version)
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id, e.payload ->> 'name', e.payload ->> 'email', e.aggregate_version
          FROM e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id),
    o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg((e.payload ->> 'customer_id')::uuid ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS customer_id,
               (array_agg(e.payload ->> 'status' ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS status,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- orders with a state event in the batch: new state only over an older version, plus lines
    os AS (
        INSERT INTO customer_stats_orders AS s (order_id, customer_id, status, total_cents, version)
        SELECT o.order_id, o.customer_id, o.status, o.total_cents, o.version
          FROM o
         WHERE o.version IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               version = greatest(s.version, excluded.version),
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.total_cents <> 0
        RETURNING s.customer_id),
    -- orders with only lines in the batch
    ol AS (
        UPDATE customer_stats_orders s
           SET total_cents = s.total_cents + o.total_cents
          FROM o
         WHERE s.order_id = o.order_id
           AND o.version IS NULL
           AND o.total_cents <> 0
        RETURNING s.customer_id)
    SELECT array_agg(DISTINCT t.customer_id) INTO touched
      FROM (SELECT cu.customer_id FROM cu
            UNION ALL SELECT os.customer_id FROM os
            UNION ALL SELECT ol.customer_id FROM ol) t;

    IF touched IS NULL THEN
        RETURN;
    END IF;

    INSERT INTO customer_stats AS s
           (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents)
    SELECT c.customer_id, c.name, c.email,
           count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM customer_stats_customers c
      LEFT JOIN customer_stats_orders o ON o.customer_id = c.customer_id
     WHERE c.customer_id = ANY (touched)
     GROUP BY c.customer_id
    ON CONFLICT (customer_id) DO UPDATE
       SET name = excluded.name,
           email = excluded.email,
           orders_placed = excluded.orders_placed,
           orders_cancelled = excluded.orders_cancelled,
           orders_shipped = excluded.orders_shipped,
           lifetime_value_cents = excluded.lifetime_value_cents
     WHERE (s.name, s.email, s.orders_placed, s.orders_cancelled, s.orders_shipped, s.lifetime_value_cents)
           IS DISTINCT FROM (excluded.name, excluded.email, excluded.orders_placed, excluded.orders_cancelled,
                             excluded.orders_shipped, excluded.lifetime_value_cents);
END
$$;

-- sql/shop_proj/data/projections.sql
-- The shop's three projections.
SELECT cqrs.register_projection(
    'order_summary', 'sql', 'shop_proj.apply_order_summary',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.order_summary', 'shop_proj.order_summary_customers']::regclass[]);
SELECT cqrs.register_projection(
    'customer_stats', 'sql', 'shop_proj.apply_customer_stats',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.customer_stats', 'shop_proj.customer_stats_customers',
                    'shop_proj.customer_stats_orders']::regclass[]);
SELECT cqrs.register_projection(
    'product_sales', 'matview',
    matview => 'shop_read.product_sales',
    event_types => ARRAY['product.created', 'product.updated',
                         'order.created', 'order.updated', 'order_line.created']);

-- sql/privileges.sql
-- Least privilege: no function is executable by PUBLIC; each group role gets only what
-- its users need. SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA cqrs, shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs, shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else (cqrs for the receipt type only).
GRANT USAGE ON SCHEMA shop, cqrs TO cqrs_writer;
GRANT EXECUTE ON FUNCTION
    shop.register_customer(uuid, text, text),
    shop.rename_customer(uuid, uuid, text, integer),
    shop.add_product(uuid, text, text, bigint, integer),
    shop.restock(uuid, text, integer),
    shop.change_price(uuid, text, bigint),
    shop.place_order(uuid, uuid, jsonb),
    shop.cancel_order(uuid, uuid, integer),
    shop.ship_order(uuid, uuid, integer)
TO cqrs_writer;

-- cqrs_reader: the read model and read-your-writes.
GRANT USAGE ON SCHEMA shop_read, cqrs TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.caught_up(bigint, text) TO cqrs_reader;

-- cqrs_listener: what the daemon calls, and the list of projections it runs. A python
-- projection's handler writes its tables as this role: grant those with the projection.
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
    cqrs.caught_up(bigint, text)
TO cqrs_listener;
