-- sql/cqrs/roles.sql
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

-- sql/cqrs/types/claim.sql
-- What cqrs._claim_command returns: the first receipt if the command already ran
-- (duplicate = true), or the CQ005 message if its id was used for something else; both
-- NULL when the caller should go on.
CREATE TYPE cqrs.claim AS (
    receipt  cqrs.receipt,
    conflict text
);

-- sql/cqrs/tables/outbox.sql
-- The append-only event log, written only by the capture triggers (cqrs.capture_changes) in the command's transaction.
-- position is taken at insert, under the row locks of the writing transaction: it follows
-- version order within an aggregate, and every reader reads in position order, but only
-- up to the final position (cqrs._read_limit): an event is appended before its
-- transaction commits, so a later position can be visible while an earlier one is not yet.
-- tx_id is the writing transaction (a command's receipt token) for cqrs.caught_up.
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
    name             text PRIMARY KEY,
    kind             text NOT NULL,
    apply_function   regproc,
    matview          regclass,
    -- matview: refresh only for these; python: the handler sees only these (NULL: all)
    event_types      text[],
    -- sql: the schemas its apply function finds its tables in, and the tables it owns
    -- (what cqrs-pg rebuild builds anew and swaps in); python: the schemas its handler's
    -- unqualified table names resolve in, and the tables it writes (what a rebuild copies
    -- and swaps in, as for sql)
    search_path      text,
    tables           regclass[],
    -- the checkpoint: every event at or below last_position is applied, and no other
    last_position    bigint NOT NULL DEFAULT 0,
    applied_events   bigint NOT NULL DEFAULT 0,
    -- every transaction with an xid below horizon is wholly applied (cqrs.caught_up), as
    -- found for the checkpoint at horizon_position (cqrs._horizon may put it off)
    horizon          xid8 NOT NULL DEFAULT '0',
    horizon_position bigint NOT NULL DEFAULT 0,
    -- what this reader learnt of how far reading may go (cqrs._read_limit): every position
    -- up to final_position is final; the mark says every position up to mark_position will
    -- be, once no transaction below mark_xmax runs
    final_position   bigint NOT NULL DEFAULT 0,
    mark_xmax        xid8,
    mark_position    bigint,
    refreshed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT projections_kind CHECK (kind IN ('sql', 'matview', 'python')),
    CONSTRAINT projections_sql_has_function CHECK (kind <> 'sql' OR (apply_function IS NOT NULL AND search_path IS NOT NULL AND tables IS NOT NULL)),
    -- python: a handler registered by name in the daemon (cqrs_pg.projections.register)
    CONSTRAINT projections_python_has_search_path CHECK (kind <> 'python' OR search_path IS NOT NULL),
    CONSTRAINT projections_matview_has_view CHECK (kind <> 'matview' OR matview IS NOT NULL)
);

-- sql/cqrs/tables/listeners.sql
-- Running daemons. A row with sleeping = true asks the outbox trigger to ring the doorbell
-- (NOTIFY); while no daemon sleeps, commands skip NOTIFY and its commit-time lock.
-- expires_at lets a killed daemon's row stop costing commands anything. final_position,
-- mark_xmax and mark_position: what the daemon found of how far reading may go, for its
-- next round (cqrs.take_mark, cqrs._read_limit).
CREATE TABLE cqrs.listeners (
    listener_id    text PRIMARY KEY,
    pid            integer NOT NULL,
    sleeping       boolean NOT NULL DEFAULT false,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at     timestamptz NOT NULL,
    final_position bigint NOT NULL DEFAULT 0,
    mark_xmax      xid8,
    mark_position  bigint
);

-- sql/cqrs/tables/rebuilds.sql
-- A rebuild in progress: the shadow schema its new tables grow in, and its own checkpoint
-- (the columns of cqrs.projections of the same names mean the same).
CREATE TABLE cqrs.rebuilds (
    projection     text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE,
    shadow_schema  name NOT NULL,
    last_position  bigint NOT NULL DEFAULT 0,
    applied_events bigint NOT NULL DEFAULT 0,
    final_position bigint NOT NULL DEFAULT 0,
    mark_xmax      xid8,
    mark_position  bigint,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- sql/cqrs/tables/refreshing.sql
-- A row per materialized-view projection (cqrs.register_projection inserts it), locked FOR UPDATE by the transaction that
-- refreshes its view (cqrs._exempt_from_fence): the row's xmax names that transaction to
-- cqrs._fence, which leaves it out. A refresh writes no events, and holds an xid for as
-- long as it runs (0.3 s for product_sales at 100k lines, measured): counted in the fence,
-- it held every projection back that long, once a second.
-- A lock writes the xid into the tuple in place: no new row versions, no bloat.
CREATE TABLE cqrs.refreshing (
    projection text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE
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

-- sql/cqrs/functions/_trim.sql
-- A text argument without leading and trailing spaces. Trims Unicode spaces by name:
-- [[:space:]] depends on the server's locale (under C.UTF-8 it misses U+00A0), so a
-- "name" of no-break spaces would pass. No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._trim(value text)
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT pg_catalog.regexp_replace(
        value,
        '^[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+'
        '|[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+$',
        '', 'g');
$$;

-- sql/cqrs/functions/_text_problem.sql
-- What is wrong with a text argument, as a CQ001 message; NULL when nothing is. Wrong:
-- null, blank, longer than max_length (once trimmed by cqrs._trim) or holding a control
-- character. cqrs._require_text raises it; a command raises it itself, so that the
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
    ELSIF length(trimmed) > max_length THEN
        RETURN format('%s must be at most %s characters, got %s: %L',
                      argument, max_length, length(trimmed), left(trimmed, 40) || '...');
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

-- sql/cqrs/functions/_range_problem.sql
-- What is wrong with a number argument, as a CQ001 message; NULL when
-- min_value <= value (<= max_value when given). No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._range_problem(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE
        WHEN value IS NULL THEN pg_catalog.format('%s must not be null', argument)
        WHEN value OPERATOR(pg_catalog.<) min_value
            THEN pg_catalog.format('%s must be at least %s, got %s', argument, min_value, value)
        WHEN value OPERATOR(pg_catalog.>) max_value
            THEN pg_catalog.format('%s must be at most %s, got %s', argument, max_value, value)
    END;
$$;

-- sql/cqrs/functions/_id_problem.sql
-- 'argument must not be null' (a CQ001 message) when an id argument is null, else NULL.
-- No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._id_problem(argument text, value uuid)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE WHEN value IS NULL THEN pg_catalog.format('%s must not be null', argument) END;
$$;

-- sql/cqrs/functions/_version_problem.sql
-- The CQ004 message when the caller named an expected_version and the row has another,
-- else NULL. No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._version_problem(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE WHEN expected_version OPERATOR(pg_catalog.<>) actual_version
                THEN pg_catalog.format('%s %s is at version %s, expected version %s',
                                       entity, id, actual_version, expected_version)
           END;
$$;

-- sql/cqrs/functions/_require_text.sql
-- Trims a text argument (cqrs._trim); CQ001 when it is null, blank, longer than
-- max_length or holds a control character (cqrs._text_problem).
CREATE OR REPLACE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._text_problem(argument, value, max_length);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    RETURN cqrs._trim(value);
END
$$;

-- sql/cqrs/functions/_require_range.sql
-- CQ001 unless min_value <= value (<= max_value when given); returns value.
CREATE OR REPLACE FUNCTION cqrs._require_range(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._range_problem(argument, value, min_value, max_value);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    RETURN value;
END
$$;

-- sql/cqrs/functions/_require_id.sql
-- CQ001 when an id argument is null; returns it.
CREATE OR REPLACE FUNCTION cqrs._require_id(argument text, value uuid)
RETURNS uuid
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem(argument, value);
    END IF;
    RETURN value;
END
$$;

-- sql/cqrs/functions/_check_version.sql
-- CQ004 when the caller named an expected_version and the row has another.
CREATE OR REPLACE FUNCTION cqrs._check_version(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._version_problem(entity, id, expected_version, actual_version);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ004', MESSAGE = problem;
    END IF;
END
$$;

-- sql/cqrs/functions/_projection.sql
-- A projection's row; CQ002 naming it when there is none.
CREATE OR REPLACE FUNCTION cqrs._projection(projection text)
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

-- sql/cqrs/functions/_claim_command.sql
-- cqrs._begin_command without raising CQ005 (cqrs.claim): `receipt` is the first receipt
-- (duplicate = true) if the same command with the same arguments already ran, NULL if the
-- caller should go on; `conflict` is the CQ005 message if the id was used for something else.
-- For commands that raise their own errors, so that the CONTEXT of a refusal names only
-- the command. command_id must not be null (check it with cqrs._id_problem first).
-- The receipt itself is written once, by cqrs._finish_command: until then an advisory
-- lock on the id makes a concurrent twin wait here, and when the first commits the twin's
-- next statement (a new snapshot, in READ COMMITTED) sees its receipt. If the first
-- aborts, the twin runs the command.
CREATE OR REPLACE FUNCTION cqrs._claim_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.claim
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
    claim cqrs.claim;
BEGIN
    IF command_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem('command_id', command_id);
    END IF;
    -- Two ids that share a hash only queue behind each other; the primary key keeps them apart.
    PERFORM cqrs._lock('command', command_id::text, true);
    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _claim_command.command_id;
    IF NOT FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        PERFORM set_config('cqrs.arguments', arguments::text, true);
    ELSIF prior.command <> command OR prior.arguments <> arguments THEN
        claim.conflict := format('command_id %s was already used for %s(%s), not for %s(%s)',
                                 command_id, prior.command, left(prior.arguments::text, 200),
                                 command, left(arguments::text, 200));
    ELSE
        claim.receipt := ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
    END IF;
    RETURN claim;
END
$$;

-- sql/cqrs/functions/_begin_command.sql
-- Claims command_id for this transaction and tags its events with it (cqrs._claim_command).
-- Returns the first receipt (duplicate = true) if the same command with the same arguments
-- already ran, NULL if the caller should go on; CQ005 if the id was used for something
-- else, CQ001 if it is null.
CREATE OR REPLACE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claim cqrs.claim;
BEGIN
    IF command_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem('command_id', command_id);
    END IF;
    claim := cqrs._claim_command(command_id, command, arguments);
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    END IF;
    RETURN claim.receipt;
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
-- It also refuses events from a transaction that the fence leaves out (a materialized
-- view's refresh, cqrs._exempt_from_fence): projections would never see them.
-- A function of its own so that `cqrs-pg bench` can swap it for its baselines.
CREATE OR REPLACE FUNCTION cqrs._ring_doorbell()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('cqrs.no_events', true) = 'on' THEN
        PERFORM cqrs._fail('CQ003', 'this transaction refreshes a materialized view projection, outside the fence: '
                                    'it must not write events (cqrs.no_events is on)');
    END IF;
    -- Asked once per transaction, by its first statement that appends events (a NOTIFY is
    -- sent at commit whichever statement asks): the later ones skip the table probe.
    IF current_setting('cqrs.doorbell_asked', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('cqrs.doorbell_asked', 'on', true);
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
-- The triggers' arguments record this call's arguments, so that a migration can regenerate
-- every capture function from the triggers alone.
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
-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions). An apply function calls it with the two positions it was given; the planner
-- inlines it, so a set-based apply function that groups the batch pays for no sort (the
-- primary key's range scan is in order already).
CREATE OR REPLACE FUNCTION cqrs.batch(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position
     ORDER BY o.position;
$$;

-- sql/cqrs/functions/_next_batch.sql
-- The next batch after a reader's checkpoint (from_position): at most max_events events
-- in position order, none above final_position. end_position: the batch's end, NULL when
-- there is nothing to apply (n = 0); a batch that is not full ends at final_position, past
-- any position no event took (a rolled-back transaction's).
-- plan_cache_mode: the one good plan is the primary key's range scan; a custom plan per
-- call cost 0.2 ms of planning on every poll of an idle projection (measured).
CREATE OR REPLACE FUNCTION cqrs._next_batch(
    from_position bigint, final_position bigint, max_events integer,
    OUT end_position bigint, OUT n bigint)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    n := 0;
    IF final_position <= from_position THEN
        RETURN;
    END IF;
    -- A full batch (the usual case in a catch-up) ends at the max_events-th event: one
    -- index walk, no count. Only a short batch is counted.
    SELECT o.position INTO end_position
      FROM cqrs.outbox o
     WHERE o.position > from_position AND o.position <= final_position
     ORDER BY o.position
    OFFSET max_events - 1
     LIMIT 1;
    IF FOUND THEN
        n := max_events::bigint;
        RETURN;
    END IF;
    SELECT count(*) INTO n FROM cqrs.outbox o WHERE o.position > from_position AND o.position <= final_position;
    end_position := CASE WHEN n > 0 THEN final_position END;
END
$$;

-- sql/cqrs/functions/_left_out_of_fence.sql
-- Whether xid x is a materialized view's refresh that the fence leaves out: the xmax of a
-- locked cqrs.refreshing row (cqrs._exempt_from_fence). The one home of that rule, for
-- cqrs._fence and cqrs.fence_blockers; only meaningful for an xid still in progress.
-- No SET clause, so the planner inlines it into its callers (which pin search_path); the
-- operator is qualified all the same.
CREATE OR REPLACE FUNCTION cqrs._left_out_of_fence(x xid)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.refreshing r WHERE r.xmax OPERATOR(pg_catalog.=) x);
$$;

-- sql/cqrs/functions/_fence.sql
-- The fence of a snapshot: every transaction with a lower xid has ended, or is a
-- materialized view's refresh that can write no events (cqrs._exempt_from_fence).
-- Without refreshes running it is pg_snapshot_xmin(snap): the lowest in-progress xid, or
-- xmax when none is. pg_snapshot_xip lists top-level xids only, so a refresh run inside
-- a subtransaction (whose lock holds the subxid) is never left out.
-- The xid-to-xid8 match by the low 32 bits is exact: in-progress xids are less than 2^31
-- apart, and VACUUM's freezing clears a lock's xmax long before its xid could recur.
CREATE OR REPLACE FUNCTION cqrs._fence(snap pg_snapshot)
RETURNS xid8
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
               (SELECT min(x.x)
                  FROM pg_snapshot_xip(snap) AS x(x)
                 WHERE NOT cqrs._left_out_of_fence(x.x::xid)),
               pg_snapshot_xmax(snap));
$$;

-- sql/cqrs/functions/_exempt_from_fence.sql
-- Leaves this transaction, a materialized view's refresh, out of every projection's fence
-- (cqrs._fence) until it ends, and makes sure it writes no events: it sets cqrs.no_events,
-- which the outbox capture refuses (cqrs._ring_doorbell), and only a transaction that has
-- written nothing yet (no xid) is left out. Then it locks the projection's row of
-- cqrs.refreshing: the lock, held to the end of the transaction, names its xid to _fence.
-- Returns whether it is left out (not if the view has no row: cqrs.register_projection
-- inserts one for every view).
CREATE OR REPLACE FUNCTION cqrs._exempt_from_fence(projection text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RETURN false;  -- may have written events already
    END IF;
    PERFORM set_config('cqrs.no_events', 'on', true);
    PERFORM 1 FROM cqrs.refreshing r WHERE r.projection = _exempt_from_fence.projection FOR UPDATE;
    RETURN FOUND;
END
$$;

-- sql/cqrs/functions/_xid_assigned.sql
-- Whether transaction id x has been handed out yet. pg_xact_status says "in the future"
-- (an error) for an id at or above the next one to be assigned; a snapshot's xmax is only
-- one more than the latest completed id, and transactions running with ids at or above it
-- are not in its list.
CREATE OR REPLACE FUNCTION cqrs._xid_assigned(x xid8)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_xact_status(x);
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

-- sql/cqrs/functions/_read_limit.sql
-- How far every reader may read the outbox now: final_position, the highest position at
-- or below which every event is final (its transaction has ended, and no transaction can
-- still add one there). Also the fence, the position to store as this transaction's mark
-- (mark_position: NULL when it cannot be one), and the highest mark stored that is not
-- usable yet (pending_position).
--
-- A transaction takes positions only after its xid (a capture trigger runs after its
-- statement's writes). A mark is a position read from the outbox's sequence by a
-- transaction that had no xid yet, stored with the xid it then took (a reader's, when it
-- commits a batch, cqrs._advance_checkpoint; a daemon's before a round, cqrs.take_mark;
-- each in its own row): every transaction that took a position up to mark_position had
-- its xid before that one, so once no transaction below mark_xmax runs (mark_xmax <= the
-- fence), every position up to mark_position is final.
-- The position read now is final at once when no transaction runs at all: none in the
-- snapshot, and no xid handed out at or above its xmax. See sql/cqrs/DESIGN.md.
CREATE OR REPLACE FUNCTION cqrs._read_limit(
    OUT final_position bigint, OUT fence xid8, OUT mark_position bigint, OUT pending_position bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    snap pg_snapshot;
    now_final bigint;
BEGIN
    -- Sessions that cache positions take them out of order: marks, and version order
    -- within an aggregate, need each one taken from the sequence itself.
    IF (SELECT s.seqcache FROM pg_sequence s WHERE s.seqrelid = 'cqrs.outbox_position_seq'::regclass) <> 1 THEN
        PERFORM cqrs._fail('CQ003', 'sequence cqrs.outbox_position_seq must not cache values: '
                                    'ALTER SEQUENCE cqrs.outbox_position_seq CACHE 1');
    END IF;
    IF pg_current_xact_id_if_assigned() IS NULL
       AND current_setting('transaction_isolation') = 'read committed' THEN
        mark_position := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    END IF;
    -- a statement of its own: READ COMMITTED takes its snapshot after the position was read
    snap := pg_current_snapshot();
    fence := cqrs._fence(snap);
    IF fence = pg_snapshot_xmax(snap) AND NOT cqrs._xid_assigned(pg_snapshot_xmax(snap)) THEN
        now_final := mark_position;
    END IF;
    SELECT greatest(max(r.final_position), max(r.mark_position) FILTER (WHERE r.mark_xmax <= fence)),
           -- a stored xid at or above xmax is not one of this cluster's (a logical restore's)
           max(r.mark_position) FILTER (WHERE r.mark_xmax > fence AND r.mark_xmax < pg_snapshot_xmax(snap))
      INTO final_position, pending_position
      FROM (SELECT p.final_position, p.mark_xmax, p.mark_position FROM cqrs.projections p
            UNION ALL
            SELECT b.final_position, b.mark_xmax, b.mark_position FROM cqrs.rebuilds b
            UNION ALL
            SELECT l.final_position, l.mark_xmax, l.mark_position FROM cqrs.listeners l) r;
    final_position := greatest(final_position, now_final, 0);
END
$$;

-- sql/cqrs/functions/_mark_replaceable.sql
-- Whether a reader may replace the mark it stored (stored_xmax) with a new one: when it
-- has none, when it is usable already (at or below the fence), or when it cannot be from
-- this cluster (at or above the xmax now, as after a logical restore). One that still
-- waits is kept: under steady writes, marks replaced every round would never become usable.
CREATE OR REPLACE FUNCTION cqrs._mark_replaceable(stored_xmax xid8, fence xid8, now_xmax xid8)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT stored_xmax IS NULL OR stored_xmax OPERATOR(pg_catalog.<=) fence
           OR stored_xmax OPERATOR(pg_catalog.>=) now_xmax;
$$;

-- sql/cqrs/functions/_needs_mark.sql
-- Whether a reader with nothing to apply should store a mark (cqrs._read_limit): positions
-- were taken beyond the final position and beyond every mark still waiting to become
-- usable, and its own stored mark may be replaced. Without one, events committed while
-- other transactions run would wait for a moment when none does.
CREATE OR REPLACE FUNCTION cqrs._needs_mark(stored_xmax xid8, final_position bigint, fence xid8, mark_position bigint,
                                 pending_position bigint)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(mark_position OPERATOR(pg_catalog.>) greatest(final_position, pending_position), false)
           AND cqrs._mark_replaceable(stored_xmax, fence, pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()));
$$;

-- sql/cqrs/functions/_horizon.sql
-- An xid below which every transaction has all its events at or below after_position,
-- for a reader that has applied everything up to there: the fence, or the oldest
-- transaction with an event after it. NULL when more than 5,000 events may lie after it
-- (a catch-up: not worth reading now; the caller keeps the horizon it has). Cheap by
-- default: more than 5,000 positions handed out after it are taken for that many events;
-- with thorough, the events themselves are counted (positions of rolled-back
-- transactions take no event).
CREATE OR REPLACE FUNCTION cqrs._horizon(after_position bigint, fence xid8, thorough boolean DEFAULT false)
RETURNS xid8
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
               WHEN coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) - after_position <= 5000
               THEN least(fence, (SELECT min(o.tx_id) FROM cqrs.outbox o WHERE o.position > after_position))
               WHEN thorough
               THEN (SELECT CASE WHEN count(*) <= 5000 THEN least(fence, min(x.tx_id)) END
                       FROM (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position > after_position
                              ORDER BY o.position LIMIT 5001) x)
           END;
$$;

-- sql/cqrs/functions/_apply_batch.sql
-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s($1, $2)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_position, to_position;
END
$$;

-- sql/cqrs/functions/_lock_space.sql
-- The key spaces of the engine's advisory locks, named once: the first key of
-- pg_advisory_xact_lock(key1, key2); the second is the hash of what is locked.
--   projection  one runner at a time applies a projection (a daemon's batch, a swap)
--   rebuild     one transaction at a time fills a projection's rebuild
--   command     a command_id's twin waits for the first (cqrs._begin_command)
-- No SET clause, so the planner inlines it and folds the constant.
CREATE OR REPLACE FUNCTION cqrs._lock_space(space text)
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE space WHEN 'projection' THEN 1668444016 WHEN 'command' THEN 1668444017 WHEN 'rebuild' THEN 1668444018 END;
$$;

-- sql/cqrs/functions/_lock.sql
-- Takes this transaction's advisory lock on `name` in key space `space` (cqrs._lock_space),
-- released at commit: waiting for it, or (wait false) only if it is free. Returns whether
-- it holds the lock.
CREATE OR REPLACE FUNCTION cqrs._lock(space text, name text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
END
$$;

-- sql/cqrs/functions/_holds_lock.sql
-- Whether this session holds the lock of cqrs._lock on `name` in key space `space`: a
-- batch may be read and completed only by the transaction that claimed it
-- (cqrs.claim_batch).
CREATE OR REPLACE FUNCTION cqrs._holds_lock(space text, name text)
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
           AND l.classid = cqrs._lock_space(space)::oid
           AND l.objid = hashtext(name)::oid
           AND l.objsubid = 2);
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
-- may be replaced (cqrs._mark_replaceable). Shared by every reader of the batch protocol.
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

-- sql/cqrs/functions/caught_up.sql
-- True once the projection (NULL: every projection) has applied every event of the
-- transaction that returned token. Reads only cqrs.projections, which replicates with
-- the read tables, so it answers correctly on a streaming replica.
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
           AND p.horizon <= token::text::xid8);
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
-- in `tables` (what cqrs-pg rebuild rebuilds). A new projection starts from the first
-- event.
CREATE OR REPLACE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF apply_function IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_proc f
         WHERE f.oid = apply_function
           AND pg_catalog.oidvectortypes(f.proargtypes) = 'bigint, bigint') THEN
        PERFORM cqrs._fail('CQ001', format(
            'apply function %s must take (from_position bigint, to_position bigint)', apply_function));
    END IF;
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables)
    VALUES (name, kind, apply_function, matview, event_types, search_path, tables);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview';
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

    -- One runner per projection at a time, across daemons. An advisory lock rather than a
    -- row lock: checking an idle projection must not take an xid (that would hold back
    -- every reader) or write WAL. The lock is released only after our commit is visible,
    -- so the next holder reads the checkpoint we wrote.
    IF NOT cqrs._lock('projection', projection, false) THEN
        RETURN QUERY SELECT 0::bigint, false, true, NULL::double precision;
        RETURN;
    END IF;
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    SELECT * INTO lim FROM cqrs._read_limit();
    -- a view's refresh covers every event up to the final position
    SELECT * INTO b FROM cqrs._next_batch(p.last_position, lim.final_position,
                                         CASE WHEN p.kind = 'sql' THEN max_events ELSE 2147483647 END);

    IF b.n = 0 THEN
        -- Nothing to apply: write only to leave a mark that lets the events committed
        -- meanwhile be read soon, or for a horizon that the last batch put off (idle:
        -- nothing).
        IF cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                               lim.pending_position)
           OR (p.horizon_position < p.last_position
               AND cqrs._horizon(p.last_position, lim.fence, true) > p.horizon) THEN
            PERFORM cqrs._advance_checkpoint(projection, false, p.last_position, 0, false,
                                             lim.final_position, lim.fence, lim.mark_position);
        END IF;
        RETURN QUERY SELECT 0::bigint, false, false, NULL::double precision;
        RETURN;
    END IF;

    IF p.kind = 'sql' THEN
        PERFORM cqrs._apply_batch(p.apply_function, p.search_path, p.last_position, b.end_position);
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
            -- Out of every reader's fence while it runs: it writes no events.
            PERFORM cqrs._exempt_from_fence(projection);
            -- CONCURRENTLY: readers on the primary keep reading, and no AccessExclusiveLock
            -- is replayed on replicas to cancel their queries.
            EXECUTE format('REFRESH MATERIALIZED VIEW CONCURRENTLY %s', p.matview);
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
        -- the rebuild's row, then the projection's lock: the order of cqrs.rebuild_finish
        SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = claim_batch.projection FOR UPDATE;
        IF NOT FOUND THEN
            PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
        END IF;
        PERFORM cqrs._lock('rebuild', projection, true);
        IF final THEN
            PERFORM cqrs._lock('projection', projection, true);
        END IF;
        checkpoint := r.last_position;
    ELSE
        -- the lock of cqrs.run_projection: released at commit, after our checkpoint is visible
        IF NOT cqrs._lock('projection', projection, false) THEN
            RETURN QUERY SELECT NULL::bigint, NULL::bigint, 0::bigint, true, NULL::text;
            RETURN;
        END IF;
        SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
        SELECT * INTO lim FROM cqrs._read_limit();
        checkpoint := p.last_position;
    END IF;
    SELECT * INTO b FROM cqrs._next_batch(checkpoint, lim.final_position, max_events);
    -- as in run_projection, an idle projection writes nothing
    IF rebuild OR b.n > 0
       OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position, lim.pending_position)
       OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, lim.fence, true) > p.horizon) THEN
        PERFORM cqrs._advance_checkpoint(projection, rebuild, checkpoint, 0, false,
                                         lim.final_position, lim.fence, lim.mark_position);
    END IF;
    RETURN QUERY SELECT checkpoint, b.end_position, b.n, false,
                        CASE WHEN rebuild THEN quote_ident(r.shadow_schema) ELSE p.search_path END;
END
$$;

-- sql/cqrs/functions/batch_events.sql
-- A python projection's batch, step 2 of 3: the events of the batch this transaction
-- claimed with cqrs.claim_batch, in position order, only those of the projection's
-- event_types (NULL: all). SECURITY DEFINER: the daemon's role needs no access to
-- cqrs.outbox itself.
CREATE OR REPLACE FUNCTION cqrs.batch_events(projection text, from_position bigint, to_position bigint)
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
    IF NOT (cqrs._holds_lock('projection', projection) OR cqrs._holds_lock('rebuild', projection)) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_position, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types);
END
$$;

-- sql/cqrs/functions/complete_batch.sql
-- A python projection's batch, step 3 of 3, in the transaction that claimed it
-- (cqrs.claim_batch, with the same rebuild) and ran the handler: advances the checkpoint
-- (a rebuild's, or the projection's, with its applied_events and horizon, exactly as
-- cqrs.run_projection does), so the handler's writes and the checkpoint commit together.
-- The arguments are claim_batch's answer; a batch that does not start at the checkpoint,
-- ends beyond what may be read, or holds another number of events is refused.
CREATE OR REPLACE FUNCTION cqrs.complete_batch(
    projection text, to_position bigint, n bigint, max_events integer DEFAULT 10000, rebuild boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    checkpoint bigint;
    final bigint;
    counted bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: %s applies it', projection, p.kind,
                                           CASE WHEN rebuild THEN 'cqrs.rebuild_step' ELSE 'cqrs.run_projection' END));
    END IF;
    IF NOT cqrs._holds_lock(CASE WHEN rebuild THEN 'rebuild' ELSE 'projection' END, projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    IF rebuild THEN
        SELECT r.last_position, r.final_position INTO checkpoint, final
          FROM cqrs.rebuilds r WHERE r.projection = complete_batch.projection;
    ELSE
        checkpoint := p.last_position;
        final := p.final_position;
    END IF;
    IF to_position IS NULL OR to_position <= checkpoint OR to_position > final THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of projection %L is not after its checkpoint %s and at most %s, as far as it may read: '
            'complete the batch cqrs.claim_batch returned',
            coalesce(to_position::text, 'NULL'), projection, checkpoint, final));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > checkpoint AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, rebuild, to_position, n, false,
                                     final, cqrs._fence(pg_current_snapshot()), NULL);
END
$$;

-- sql/cqrs/functions/rebuild_begin.sql
-- Starts (or starts over) a rebuild of a sql or python projection: empty copies of its
-- tables in a shadow schema, which its apply function (cqrs.rebuild_step) or its handler
-- (cqrs.claim_batch, cqrs.batch_events, cqrs.complete_batch with rebuild) fills from the whole
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
        -- LIKE copies columns, constraints and indexes, not storage parameters (fillfactor)
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)%s',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t,
                       (SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')
                          FROM pg_class c WHERE c.oid = t));
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
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
        PERFORM cqrs._apply_batch(p.apply_function, quote_ident(r.shadow_schema), r.last_position, b.end_position);
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
           updated_at = now()
     WHERE c.name = projection;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;

-- sql/cqrs/functions/listener_heartbeat.sql
-- A daemon says it is alive until now() + ttl, and whether it is about to sleep (then
-- commands ring the doorbell for it). Also forgets daemons that died long ago.
CREATE OR REPLACE FUNCTION cqrs.listener_heartbeat(listener_id text, sleeping boolean, ttl interval)
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
CREATE OR REPLACE FUNCTION cqrs.listener_exit(listener_id text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM cqrs.listeners l WHERE l.listener_id = listener_exit.listener_id;
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
    l cqrs.listeners;
    marking boolean;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO l FROM cqrs.listeners x WHERE x.listener_id = take_mark.listener_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    marking := cqrs._needs_mark(l.mark_xmax, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
    IF NOT marking AND lim.final_position <= l.final_position THEN
        RETURN false;  -- nothing new: no write
    END IF;
    -- a mark lost in a crash costs nothing but its use: no need to wait for the disk
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE cqrs.listeners x
       SET final_position = greatest(x.final_position, lim.final_position),
           mark_xmax = CASE WHEN marking THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN marking THEN lim.mark_position ELSE x.mark_position END
     WHERE x.listener_id = take_mark.listener_id;
    RETURN marking;
END
$$;

-- sql/cqrs/functions/mark_usable.sql
-- Whether a daemon's mark (cqrs.take_mark) is usable: every transaction that ran when it
-- was taken has ended. True when the daemon has none. Waits up to `wait` for it, looking
-- every half millisecond, so that the daemon need not ask again and again; it reads only,
-- and holds no xid meanwhile.
CREATE OR REPLACE FUNCTION cqrs.mark_usable(listener_id text, wait interval DEFAULT '0 s')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + wait;
    mark xid8;
BEGIN
    SELECT l.mark_xmax INTO mark FROM cqrs.listeners l WHERE l.listener_id = mark_usable.listener_id;
    -- each time a statement of its own: a new snapshot
    WHILE mark IS NOT NULL AND mark > cqrs._fence(pg_current_snapshot()) LOOP
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.0005);
    END LOOP;
    RETURN true;
END
$$;

-- sql/cqrs/functions/projection_status.sql
-- Per projection: checkpoint (and the transaction of the last event at or before it),
-- events not yet applied and the age of the oldest of them.
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
    refreshed_at timestamptz)
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
           p.updated_at, p.refreshed_at
      FROM cqrs.projections p
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE o.position > p.last_position) behind
     ORDER BY p.name;
$$;

-- sql/cqrs/functions/fence_blockers.sql
-- Open transactions that hold an xid, oldest first, in any database of the cluster:
-- each one holds every projection's fence back until it ends (a view's refresh, which the
-- fence leaves out, is not listed).
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
    SELECT a.pid, a.datname, a.usename, a.application_name, a.state,
           a.backend_xid,
           a.xact_start, a.query_start,
           extract(epoch FROM clock_timestamp() - a.xact_start)::double precision,
           left(a.query, 200)
      FROM pg_stat_activity a
     WHERE a.backend_xid IS NOT NULL
       AND a.pid <> pg_backend_pid()
       AND NOT cqrs._left_out_of_fence(a.backend_xid)
    UNION ALL
    SELECT NULL, x.database, x.owner, 'prepared transaction ' || x.gid, 'prepared',
           x.transaction, x.prepared, NULL,
           extract(epoch FROM clock_timestamp() - x.prepared)::double precision, NULL
      FROM pg_prepared_xacts x
     ORDER BY 9 DESC;
$$;

-- sql/cqrs/functions/fence_status.sql
-- The fence (cqrs._fence) now, and whether committed events wait above it, held back by
-- an open transaction (no reader may read them until it ends): the daemon's stall watch.
-- Reads only, so the caller takes no xid.
CREATE OR REPLACE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence,
           EXISTS (SELECT 1
                     FROM cqrs.outbox o
                    WHERE o.position > greatest((SELECT max(p.final_position) FROM cqrs.projections p), 0)
                      AND o.tx_id >= f.fence)
      FROM (SELECT cqrs._fence(pg_current_snapshot()) AS fence) f;
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
    RETURN EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND (EXISTS (SELECT 1
                          FROM cqrs.outbox o
                         WHERE o.position > p.last_position
                           AND o.position <= lim.final_position)
                OR cqrs._needs_mark(p.mark_xmax, lim.final_position, lim.fence, lim.mark_position,
                                    lim.pending_position)));
END
$$;

-- sql/cqrs/functions/prune_receipts.sql
-- Deletes up to max_rows receipts (cqrs.commands rows) older than older_than, oldest
-- first; returns how many it deleted. A retry of a pruned command_id runs the command
-- again, so keep receipts longer than any client retries. Call it until it returns 0, each
-- call in its own transaction: one huge DELETE would hold an xid, and with it every
-- projection (the xmin fence), for its whole duration.
CREATE OR REPLACE FUNCTION cqrs.prune_receipts(older_than interval, max_rows integer DEFAULT 10000)
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
    cqrs.claim_batch(text, integer, boolean, boolean),
    cqrs.batch_events(text, bigint, bigint),
    cqrs.complete_batch(text, bigint, bigint, integer, boolean),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.take_mark(text),
    cqrs.mark_usable(text, interval),
    cqrs.projection_status(),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.work_pending(text[]),
    cqrs.caught_up(bigint, text),
    cqrs.prune_receipts(interval, integer)
TO cqrs_listener;
