-- migrations/versions/0002/before.sql
-- 0002, first: drops and ALTERs that the new definitions below need.
SELECT 1;
-- Read-model sums over many orders in numeric (0001: bigint, which one customer's or one
-- product's orders could overflow, stopping the projection). The view is created anew
-- from sql/ below; the registry follows its new oid in capture.sql's neighbour, after.sql.
ALTER TABLE shop_read.customer_stats ALTER COLUMN lifetime_value_cents TYPE numeric;
DROP MATERIALIZED VIEW shop_read.product_sales;

-- sql/cqrs/indexes/commands_created_at.sql
-- For cqrs.prune_receipts: the oldest receipts without a scan of them all.
CREATE INDEX commands_created_at_idx ON cqrs.commands (created_at);

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

-- sql/shop/functions/_parse_order_lines.sql
-- Validates place_order's lines: a JSON array of 1 to 100 {"sku": text, "quantity": integer > 0},
-- each sku once. Returns them as two arrays in line order; CQ001 naming the first bad entry.
CREATE OR REPLACE FUNCTION shop._parse_order_lines(lines jsonb, OUT skus text[], OUT quantities integer[])
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    line jsonb;
    i integer := 0;
    sku text;
    quantity numeric;
    unknown text;
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
        -- A misspelt or extra key ("qty", "price") is a mistake, not something to ignore.
        SELECT k INTO unknown FROM jsonb_object_keys(line) k WHERE k NOT IN ('sku', 'quantity') LIMIT 1;
        IF FOUND THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s] has an unknown key %L: only "sku" and "quantity" are allowed',
                                               i, left(unknown, 40)));
        END IF;
        sku := cqrs._require_text(format('lines[%s].sku', i), line ->> 'sku', 100);
        quantity := (line -> 'quantity')::numeric;
        IF quantity <> trunc(quantity) OR quantity < 1 OR quantity > 2147483647 THEN
            PERFORM cqrs._fail('CQ001', format('lines[%s].quantity must be a whole number from 1 to 2147483647, got %s',
                                               i, left((line -> 'quantity')::text, 40)));
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
CREATE OR REPLACE FUNCTION shop._close_order(command text, command_id uuid, order_id uuid, expected_version integer, new_status text)
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
    IF expected_version IS NOT NULL THEN  -- versions start at 1
        PERFORM cqrs._require_range('expected_version', expected_version, 1);
    END IF;
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

-- sql/shop/functions/rename_customer.sql
-- Gives a customer a new name.
CREATE OR REPLACE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
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
    IF expected_version IS NOT NULL THEN  -- versions start at 1
        PERFORM cqrs._require_range('expected_version', expected_version, 1);
    END IF;
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

-- sql/shop/functions/place_order.sql
-- Places an order: takes the stock of every line and captures each product's current price.
CREATE OR REPLACE FUNCTION shop.place_order(command_id uuid, customer_id uuid, lines jsonb)
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
    total numeric;
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

    -- Read models sum quantity * unit_price_cents in bigint: an order they cannot total
    -- would stop every projection, so it is refused here.
    SELECT sum(l.quantity::numeric * p.price_cents) INTO total
      FROM unnest(parsed.skus, parsed.quantities) AS l(sku, quantity)
      JOIN shop.products p ON p.sku = l.sku;
    IF total > 9223372036854775807 THEN
        PERFORM cqrs._fail('CQ003', format('order total of %s cents exceeds the largest allowed, 9223372036854775807',
                                           total));
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

-- sql/shop_read/views/product_sales.sql
-- One row per product: units sold and revenue over lines of orders not cancelled
-- (revenue numeric: each line's value fits a bigint, the sum over all lines need not).
-- Refreshed CONCURRENTLY by the daemon, which needs the unique index on product_id.
CREATE MATERIALIZED VIEW shop_read.product_sales AS
SELECT p.id AS product_id,
       p.sku,
       p.name,
       p.price_cents,
       p.stock,
       coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS units_sold,
       coalesce(sum(l.quantity * l.unit_price_cents) FILTER (WHERE o.status <> 'cancelled'), 0)::numeric AS revenue_cents
  FROM shop.products p
  LEFT JOIN shop.order_lines l ON l.product_id = p.id
  LEFT JOIN shop.orders o ON o.id = l.order_id
 GROUP BY p.id;

CREATE UNIQUE INDEX product_sales_product_id ON shop_read.product_sales (product_id);

-- sql/shop_proj/functions/apply_order_summary.sql
-- Applies one batch of events to order_summary, set-based, in three statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy, and then their orders renamed, by index: the renamed
--    customers pass as arrays, whose size the planner sees (joined to the upsert's
--    RETURNING, a guessed size, the update scanned all of order_summary);
-- 2. per order in the batch, one group holds its latest state and its new lines, so an
--    order's row is written once: upserted with its state (applied only over an older
--    version) plus its lines, or, lines only, updated.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_order_summary(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    renamed uuid[];
    names text[];
    emails text[];
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC),
    cu AS (
        INSERT INTO order_summary_customers AS c (customer_id, name, email, version)
        SELECT bc.customer_id, bc.name, bc.email, bc.version FROM bc
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id, c.name, c.email)
    SELECT array_agg(cu.customer_id), array_agg(cu.name), array_agg(cu.email)
      INTO renamed, names, emails
      FROM cu;

    -- Orders placed before their customer's event was applied get the name here too.
    IF renamed IS NOT NULL THEN
        UPDATE order_summary s
           SET customer_name = cu.name, customer_email = cu.email
          FROM unnest(renamed, names, emails) AS cu(customer_id, name, email)
         WHERE s.customer_id = cu.customer_id
           AND (s.customer_name, s.customer_email) IS DISTINCT FROM (cu.name, cu.email);
    END IF;

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
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
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
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    touched uuid[];
BEGIN
    WITH e AS MATERIALIZED (
        SELECT e.event_type, e.aggregate_id, e.aggregate_version, e.payload
          FROM cqrs.batch_unordered(from_tx, from_position, to_tx, to_position) e
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

-- sql/privileges.sql
-- Least privilege for the shop (the cqrs core's own grants are in sql/cqrs/privileges.sql):
-- no function is executable by PUBLIC; each group role gets only what its users need.
-- SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else.
GRANT USAGE ON SCHEMA shop TO cqrs_writer;
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

-- cqrs_reader: the read model.
GRANT USAGE ON SCHEMA shop_read TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;

-- migrations/versions/0002/after.sql
-- 0002, last: grants and data changes after the new definitions.
SELECT 1;
-- product_sales was created anew (before.sql, then sql/): the registry follows its oid.
UPDATE cqrs.projections SET matview = 'shop_read.product_sales'::regclass WHERE name = 'product_sales';

-- migrations/versions/0002/capture.sql
-- Outbox capture: every table that 0001's generic cqrs.tg_capture captured (by dynamic SQL
-- on every statement) gets a generated function of its own, attached with the same
-- arguments (the triggers' arguments); then tg_capture goes.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT DISTINCT tg.tgrelid::regclass AS tbl, string_to_array(encode(tg.tgargs, 'escape'), '\000') AS args
          FROM pg_trigger tg
         WHERE tg.tgfoid = 'cqrs.tg_capture()'::regprocedure AND NOT tg.tgisinternal
         ORDER BY 1
    LOOP
        PERFORM cqrs.capture_changes(t.tbl, t.args[1], t.args[2], t.args[3], nullif(t.args[4], ''));
    END LOOP;
END
$$;
DROP FUNCTION cqrs.tg_capture();
