-- cqrs_0003: the outbox is partitioned by position, so that history leaves by dropping
-- whole partitions (cqrs.prune) and never by DELETE; cqrs.extend_outbox keeps partitions
-- ready ahead of the sequence. The events already there stay where they are: the table
-- that holds them becomes the first partition, for every position up to the end of the
-- million its last position falls in (attaching it reads it once, under the outbox's
-- lock: writers wait for that).
-- A sql or python projection may declare its state function, how its read model is
-- computed from the write model: a rebuild then loads that under one snapshot and reads
-- the log from there (cqrs.rebuild_load), needing no history; cqrs.verify compares a read
-- model with it.
-- Leaner events: a payload leaves out the columns the event carries already (the
-- aggregate's id and version), and metadata holds the command's id only (its receipt in
-- cqrs.commands names the command, once per transaction); every capture function is
-- generated again.
-- Each event records the version of its payload's shape (payload_version, as
-- cqrs.capture_changes is told); after a migration changes a captured table, upcasters
-- (cqrs.register_upcaster) turn older payloads into the newest shape wherever the engine
-- reads events (cqrs.batch).

SELECT pg_catalog.set_config('cqrs.migrating_last_position',
                             coalesce(pg_catalog.pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0)::text,
                             true);
LOCK TABLE cqrs.outbox IN ACCESS EXCLUSIVE MODE;
-- functions whose type is the outbox's row: made again below for the partitioned table
DROP FUNCTION cqrs.batch_events(text, bigint, bigint);
DROP FUNCTION cqrs.batch(bigint, bigint);
-- a new optional argument, payload_version
DROP FUNCTION cqrs.capture_changes(regclass, text, text, name, name);
-- a new optional argument, state_function
DROP FUNCTION cqrs.register_projection(text, text, regproc, regclass, text[], text, regclass[], text);
ALTER TABLE cqrs.projections ADD COLUMN state_function text;
ALTER TABLE cqrs.rebuilds ADD COLUMN snapshot pg_snapshot, ADD COLUMN snapshot_position bigint;
-- every event so far is of its table's first shape (no rewrite: a constant default)
ALTER TABLE cqrs.outbox ADD COLUMN payload_version integer NOT NULL DEFAULT 1;
ALTER TABLE cqrs.outbox ALTER COLUMN position DROP IDENTITY;
ALTER TABLE cqrs.outbox
    ALTER COLUMN payload_version DROP DEFAULT,
    ALTER COLUMN tx_id DROP DEFAULT,
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN occurred_at DROP DEFAULT;
ALTER TABLE cqrs.outbox RENAME CONSTRAINT outbox_pkey TO outbox_0_pkey;
ALTER TABLE cqrs.outbox RENAME TO outbox_0;

-- sql/cqrs/tables/outbox.sql
-- The append-only event log, written only by the capture triggers (cqrs.capture_changes) in the command's transaction.
-- position is taken at insert, under the row locks of the writing transaction: it follows
-- version order within an aggregate, and every reader reads in position order, but only
-- up to the final position (cqrs._read_limit): an event is appended before its
-- transaction commits, so a later position can be visible while an earlier one is not yet.
-- The sequence must not cache values (cqrs._read_limit refuses one that does).
-- tx_id is the writing transaction (a command's receipt token) for cqrs.caught_up.
-- Partitioned by position, so that history leaves by dropping whole partitions
-- (cqrs.prune), never by a DELETE; cqrs.extend_outbox keeps partitions ready ahead of the
-- sequence, and the default partition takes what comes beyond them until it runs again.
CREATE SEQUENCE cqrs.outbox_position_seq AS bigint CACHE 1;
CREATE TABLE cqrs.outbox (
    position          bigint NOT NULL DEFAULT pg_catalog.nextval('cqrs.outbox_position_seq'::regclass),
    tx_id             xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    event_type        text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      uuid NOT NULL,
    aggregate_version integer NOT NULL,
    payload           jsonb NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- the version of the payload's shape (its table's columns), as cqrs.capture_changes
    -- was told; readers get it upcast to the newest (cqrs.register_upcaster)
    payload_version   integer NOT NULL DEFAULT 1,
    CONSTRAINT outbox_pkey PRIMARY KEY (position)
) PARTITION BY RANGE (position);
ALTER SEQUENCE cqrs.outbox_position_seq OWNED BY cqrs.outbox.position;
CREATE TABLE cqrs.outbox_default PARTITION OF cqrs.outbox DEFAULT;

DO $$
DECLARE
    last bigint := pg_catalog.current_setting('cqrs.migrating_last_position')::bigint;
BEGIN
    IF last > 0 THEN
        PERFORM pg_catalog.setval('cqrs.outbox_position_seq'::regclass, last);
    END IF;
    EXECUTE pg_catalog.format('ALTER TABLE cqrs.outbox ATTACH PARTITION cqrs.outbox_0 FOR VALUES FROM (MINVALUE) TO (%s)',
                              (last / 1000000 + 1) * 1000000);
END
$$;

-- sql/cqrs/tables/upcasters.sql
-- How an event's payload of one shape becomes the next (cqrs.register_upcaster): for
-- event_type, function(payload jsonb) RETURNS jsonb turns a payload of from_version into
-- one of from_version + 1. Readers (cqrs.batch) apply them in turn, so every projection,
-- handler and rebuild sees each event in its type's newest shape.
CREATE TABLE cqrs.upcasters (
    event_type   text NOT NULL,
    from_version integer NOT NULL,
    function     text NOT NULL,
    PRIMARY KEY (event_type, from_version),
    CONSTRAINT upcasters_from_version CHECK (from_version >= 1)
);

-- sql/cqrs/functions/capture_changes.sql
-- Captures a table's changes in the outbox: for a table whose rows belong to an
-- aggregate, generates its own trigger function cqrs._capture_<schema>_<table>() and
-- attaches it AFTER INSERT, UPDATE and DELETE, statement level, with a transition table:
-- one INSERT into cqrs.outbox per statement, one event per changed row
-- (event_type = entity.created|updated|deleted; payload = the row as jsonb less the columns
-- the event carries already, id_column as aggregate_id and version_column as
-- aggregate_version; metadata = the command's id, whose receipt in cqrs.commands names
-- the command once per transaction; payload_version = the shape's version: after a
-- migration changes the table's columns, call this again with the next version and
-- register upcasters, cqrs.register_upcaster; see docs/events.md). The generated INSERT
-- is static SQL, planned once per session;
-- a generic function running it through EXECUTE re-planned it on every statement
-- (measured: a sixth of a place_order). Calling it again for a table replaces both.
-- The triggers' arguments record this call's arguments, so that a migration can regenerate
-- every capture function from the triggers alone.
CREATE OR REPLACE FUNCTION cqrs.capture_changes(
    tbl regclass,
    aggregate_type text,
    entity text,
    id_column name,
    version_column name DEFAULT NULL,
    payload_version integer DEFAULT 1)
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
    PERFORM cqrs._require_range('payload_version', payload_version, 1, 1000000);
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
        'command_id', nullif(current_setting('cqrs.command_id', true), '')));
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata,
                                 payload_version)
        SELECT %1$L, %4$L, r.%5$I, %6$s, to_jsonb(r) - %7$L::text[], metadata, %8$s FROM new_rows r;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata,
                                 payload_version)
        SELECT %2$L, %4$L, r.%5$I, %6$s, to_jsonb(r) - %7$L::text[], metadata, %8$s FROM new_rows r;
    ELSE
        INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata,
                                 payload_version)
        SELECT %3$L, %4$L, r.%5$I, %6$s, to_jsonb(r) - %7$L::text[], metadata, %8$s FROM old_rows r;
    END IF;
    PERFORM cqrs._ring_doorbell();
    RETURN NULL;
END
$body$,
        entity || '.created', entity || '.updated', entity || '.deleted', aggregate_type, id_column,
        CASE WHEN version_column IS NULL THEN '1' ELSE format('r.%I', version_column) END,
        array_remove(ARRAY[id_column, version_column]::text[], NULL), payload_version);

    EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql'
                   ' SET search_path = pg_catalog, pg_temp AS %L', fn, body);
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s() FROM PUBLIC', fn);
    EXECUTE format('COMMENT ON FUNCTION %s() IS %L', fn,
                   format('Outbox capture for %s, generated by cqrs.capture_changes', tbl));
    FOREACH op IN ARRAY ARRAY['INSERT', 'UPDATE', 'DELETE'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', '_500_outbox_' || lower(op), tbl);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s TABLE AS %s
             FOR EACH STATEMENT EXECUTE FUNCTION %s(%L, %L, %L, %L, %L)',
            '_500_outbox_' || lower(op), op, tbl,
            CASE op WHEN 'DELETE' THEN 'OLD' ELSE 'NEW' END,
            CASE op WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END,
            fn, aggregate_type, entity, id_column, coalesce(version_column, ''), payload_version);
    END LOOP;
END
$$;

-- sql/cqrs/functions/register_upcaster.sql
-- Declares how payloads of event_type at from_version become the next version's, after a
-- migration changed the captured table's columns (and called cqrs.capture_changes with
-- the new payload_version): upcaster(payload jsonb) RETURNS jsonb. Every reader then gets
-- older events in the newest shape (cqrs.batch), so projections and rebuilds need to
-- know only that one. Register one for each event type of the table (created, updated,
-- deleted). CQ001: not such a function, or a version below 1; CQ003: one is registered
-- for that version already.
CREATE OR REPLACE FUNCTION cqrs.register_upcaster(event_type text, from_version integer, upcaster regproc)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    event_type := cqrs._require_text('event_type', event_type, 200);
    PERFORM cqrs._require_range('from_version', from_version, 1);
    IF upcaster IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_proc f
         WHERE f.oid = upcaster AND f.prorettype = 'jsonb'::regtype
           AND pg_catalog.oidvectortypes(f.proargtypes) = 'jsonb') THEN
        PERFORM cqrs._fail('CQ001', format('upcaster %s must take (payload jsonb) and return jsonb',
                                           coalesce(upcaster::text, 'null')));
    END IF;
    IF EXISTS (SELECT 1 FROM cqrs.upcasters u
                WHERE u.event_type = register_upcaster.event_type AND u.from_version = register_upcaster.from_version) THEN
        PERFORM cqrs._fail('CQ003', format('an upcaster of %s payloads from version %s is registered already',
                                           event_type, from_version));
    END IF;
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    INSERT INTO cqrs.upcasters (event_type, from_version, function)
    VALUES (event_type, from_version, upcaster::text);
END
$$;

-- sql/cqrs/functions/_upcast.sql
-- An event's payload in its type's newest shape: the upcasters from its payload_version
-- on, applied in turn (cqrs.upcasters); cqrs._upcast_version is the version it reaches.
CREATE OR REPLACE FUNCTION cqrs._upcast(event_type text, payload_version integer, payload jsonb)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn text;
    v integer := payload_version;
BEGIN
    LOOP
        SELECT u.function INTO fn FROM cqrs.upcasters u WHERE u.event_type = _upcast.event_type AND u.from_version = v;
        EXIT WHEN NOT FOUND;
        EXECUTE format('SELECT %s($1)', fn::regproc) INTO payload USING payload;
        v := v + 1;
    END LOOP;
    RETURN payload;
END
$$;

-- sql/cqrs/functions/_upcast_version.sql
-- The version cqrs._upcast takes a payload of event_type at payload_version to.
CREATE OR REPLACE FUNCTION cqrs._upcast_version(event_type text, payload_version integer)
RETURNS integer
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE chain(v) AS (
        SELECT payload_version
        UNION ALL
        SELECT c.v + 1 FROM chain c JOIN cqrs.upcasters u ON u.event_type = _upcast_version.event_type AND u.from_version = c.v)
    SELECT max(v) FROM chain;
$$;

-- sql/cqrs/functions/batch.sql
-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions), each payload in its type's newest shape (cqrs.register_upcaster). An apply
-- function calls it with the two positions it was given; the planner inlines it, so a
-- set-based apply function that groups the batch pays for no sort (the primary key's
-- range scan is in order already), and it reads only the partitions that hold the batch,
-- whatever the length of the history. A rebuild from state reads only the events of
-- transactions its loaded state does not hold (cqrs._rebuild_reads).
CREATE OR REPLACE FUNCTION cqrs.batch(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    -- Upcast only while some upcaster is registered (that subquery is evaluated once per
    -- call), and only an event of a shape that has one (a primary-key probe).
    SELECT o.position, o.tx_id, o.event_type, o.aggregate_type, o.aggregate_id, o.aggregate_version,
           CASE WHEN NOT (SELECT EXISTS (SELECT 1 FROM cqrs.upcasters)) THEN o.payload
                WHEN EXISTS (SELECT 1 FROM cqrs.upcasters u
                              WHERE u.event_type = o.event_type AND u.from_version = o.payload_version)
                THEN cqrs._upcast(o.event_type, o.payload_version, o.payload)
                ELSE o.payload END,
           o.metadata, o.occurred_at,
           CASE WHEN NOT (SELECT EXISTS (SELECT 1 FROM cqrs.upcasters)) THEN o.payload_version
                WHEN EXISTS (SELECT 1 FROM cqrs.upcasters u
                              WHERE u.event_type = o.event_type AND u.from_version = o.payload_version)
                THEN cqrs._upcast_version(o.event_type, o.payload_version)
                ELSE o.payload_version END
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position
       -- in a rebuild from state, not the events its loaded state holds (cqrs._rebuild_reads);
       -- each subquery is evaluated once per call, not per event
       AND ((SELECT nullif(current_setting('cqrs.loaded_snapshot', true), '')) IS NULL
            OR NOT pg_visible_in_snapshot(o.tx_id, (SELECT current_setting('cqrs.loaded_snapshot')::pg_snapshot)))
     ORDER BY o.position;
$$;

-- sql/cqrs/functions/batch_events.sql
-- A python projection's batch, step 2 of 3: the events of the batch this transaction
-- claimed with cqrs.claim_batch, in position order, only those of the projection's
-- event_types (NULL: all), with the outbox's columns. SECURITY DEFINER: the daemon's
-- role needs no access to cqrs.outbox itself.
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

-- sql/cqrs/functions/_outbox_partitions.sql
-- The outbox's range partitions, in position order: by the first position in each one's
-- name (cqrs.extend_outbox names them), read from the catalogs, which are the only record
-- of them. Their bounds: cqrs._partition_bounds, deparsed only for the partitions a
-- caller looks at (cqrs.prune stops at the first it keeps).
CREATE OR REPLACE FUNCTION cqrs._outbox_partitions()
RETURNS TABLE (partition regclass)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'cqrs.outbox'::regclass
       AND c.relname ~ '^outbox_[0-9]+$'  -- not the default partition
     ORDER BY substr(c.relname, 8)::numeric;
$$;

-- sql/cqrs/functions/_partition_bounds.sql
-- A partition of the outbox holds the positions from first_position (NULL: every position
-- below end_position) up to, not including, end_position.
CREATE OR REPLACE FUNCTION cqrs._partition_bounds(partition regclass, OUT first_position bigint, OUT end_position bigint)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT nullif(btrim(b[1], ''''), 'MINVALUE')::bigint, btrim(b[2], '''')::bigint
      FROM pg_class c
     CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') b
     WHERE c.oid = partition;
$$;

-- sql/cqrs/functions/_history_start.sql
-- The first position the outbox still holds history from: NULL while it holds all of it,
-- else the first position of its oldest partition (cqrs.prune dropped those before).
CREATE OR REPLACE FUNCTION cqrs._history_start()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.first_position
      FROM (SELECT p.partition FROM cqrs._outbox_partitions() p LIMIT 1) p
     CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
$$;

-- sql/cqrs/functions/_state_function_problem.sql
-- Why state_function cannot be a projection's state function (NULL: it can): it must take
-- no arguments and return void.
CREATE OR REPLACE FUNCTION cqrs._state_function_problem(state_function regproc)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('state function %s must take no arguments and return void', state_function)
     WHERE NOT EXISTS (SELECT 1 FROM pg_proc f
                        WHERE f.oid = state_function AND f.pronargs = 0 AND f.prorettype = 'void'::regtype);
$$;

-- sql/cqrs/functions/_load_state.sql
-- Runs a projection's state function, its unqualified table names resolved through
-- search_path (a rebuild's shadow schema, or cqrs.verify's temporary tables), as
-- cqrs._apply_batch runs an apply function.
CREATE OR REPLACE FUNCTION cqrs._load_state(state_function regproc, search_path text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s()', state_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _load_state.search_path || ', pg_temp', true);
    EXECUTE call;
END
$$;

-- sql/cqrs/functions/set_state_function.sql
-- Declares how a sql or python projection's read model is computed from the write model:
-- state_function() fills the projection's tables, found through its search_path, with
-- what its events add up to from the write model's current state (NULL: no longer
-- declared). `cqrs-pg rebuild` then loads the read model from it, resuming the event log
-- exactly where its snapshot leaves off, and `cqrs-pg verify` compares the read model with
-- it. A materialized view needs none: its query is its definition.
CREATE OR REPLACE FUNCTION cqrs.set_state_function(projection text, state_function regproc)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections := cqrs._projection(projection);
    problem text := cqrs._state_function_problem(state_function);
BEGIN
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s: its query is its definition, it takes no state function', projection, p.kind));
    END IF;
    IF state_function IS NOT NULL AND problem IS NOT NULL THEN
        PERFORM cqrs._fail('CQ001', problem);
    END IF;
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    UPDATE cqrs.projections c SET state_function = set_state_function.state_function::text, updated_at = now()
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
-- a matview, whose refresh covers every event). state_function (sql and python): how the
-- read model is computed from the write model (cqrs.set_state_function). A new
-- projection starts from the first event, refused (CQ003) once history was pruned unless
-- it declares a state function: then `cqrs-pg rebuild` loads it first.
CREATE OR REPLACE FUNCTION cqrs.register_projection(
    name text,
    kind text,
    apply_function regproc DEFAULT NULL,
    matview regclass DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    search_path text DEFAULT NULL,
    tables regclass[] DEFAULT NULL,
    on_error text DEFAULT 'halt',
    state_function regproc DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pruned_before bigint := cqrs._history_start();
    problem text := cqrs._state_function_problem(state_function);
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
    IF state_function IS NOT NULL THEN
        IF kind = 'matview' THEN
            PERFORM cqrs._fail('CQ001', format(
                'matview projection %L takes no state function: its query is its definition', name));
        ELSIF problem IS NOT NULL THEN
            PERFORM cqrs._fail('CQ001', problem);
        END IF;
    END IF;
    IF kind <> 'matview' AND state_function IS NULL AND pruned_before IS NOT NULL THEN
        PERFORM cqrs._fail('CQ003', format(
            'the outbox''s history before position %s was pruned: projection %L could not see it; declare how '
            'its read model is computed from the write model (state_function) and load it with cqrs-pg rebuild',
            pruned_before, name));
    END IF;
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables, on_error,
                                  state_function)
    VALUES (name, kind, apply_function::text, matview::text, event_types, search_path, tables::text[], on_error,
            state_function::text);
    -- a view's row of cqrs.refreshing, there before its first refresh (cqrs._exempt_from_fence)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview';
END
$$;

-- sql/cqrs/functions/_rebuild_reads.sql
-- Before a rebuild reads its next events (cqrs.rebuild_step, cqrs.rebuild_finish,
-- cqrs.claim_batch with rebuild): refuses (CQ003) to read history the outbox no longer
-- holds (cqrs.prune dropped it), and for a rebuild from state, has cqrs.batch leave out
-- the events of transactions the loaded state's snapshot sees (they are in it) until its
-- checkpoint is past every one of them. Local to the caller's transaction.
CREATE OR REPLACE FUNCTION cqrs._rebuild_reads(r cqrs.rebuilds)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    start bigint := cqrs._history_start();
BEGIN
    IF start IS NOT NULL AND r.last_position < start - 1 THEN
        PERFORM cqrs._fail('CQ003', format(
            'the outbox''s history before position %s was pruned: projection %L can be rebuilt only from the '
            'write model''s state; declare its state function (cqrs.set_state_function), abandon this rebuild '
            '(cqrs-pg rebuild --abort %s) and rebuild again', start, r.projection, r.projection));
    END IF;
    PERFORM set_config('cqrs.loaded_snapshot',
                       CASE WHEN r.snapshot IS NOT NULL AND r.last_position < r.snapshot_position
                            THEN r.snapshot::text ELSE '' END,
                       true);
END
$$;

-- sql/cqrs/functions/rebuild_begin.sql
-- Starts a rebuild of a sql or python projection: empty copies of its tables in a shadow
-- schema, which its apply function (cqrs.rebuild_step) or its handler (cqrs.claim_batch,
-- cqrs.batch_events, cqrs.complete_batch with rebuild) fills from the whole event log, or
-- from where its state function's load (cqrs.rebuild_load) leaves off, while the daemon
-- keeps the live tables current and readers keep reading them. Refused (CQ003) from the
-- log once history was pruned. Refused
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
    pruned_before bigint := cqrs._history_start();
BEGIN
    p := cqrs._projection(projection);
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    IF p.state_function IS NULL AND pruned_before IS NOT NULL THEN
        PERFORM cqrs._fail('CQ003', format(
            'the outbox''s history before position %s was pruned: projection %L can be rebuilt only from the '
            'write model''s state; declare its state function (cqrs.set_state_function)',
            pruned_before, projection));
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

-- sql/cqrs/functions/rebuild_load.sql
-- Loads a rebuild's shadow tables from the write model's current state: runs the
-- projection's state function into them, under this transaction's one snapshot (hence
-- REPEATABLE READ or SERIALIZABLE, refused otherwise), right after cqrs.rebuild_begin.
-- The rebuild then goes on from the log exactly where that snapshot leaves off: from the
-- final position (every event up to it is in the snapshot), applying only the events of
-- transactions the snapshot does not see (cqrs._rebuild_reads), so that no event is in
-- the new read model twice or not at all, however writers run meanwhile. Needs no
-- history: the rebuild reads the log only from the final position on. Returns that
-- position.
CREATE OR REPLACE FUNCTION cqrs.rebuild_load(projection text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM cqrs._fail('CQ003', 'cqrs.rebuild_load reads the write model under one snapshot: call it in a '
                                    'REPEATABLE READ transaction (BEGIN ISOLATION LEVEL REPEATABLE READ)');
    END IF;
    -- every position up to final_position was taken by a transaction that had ended when
    -- this transaction's snapshot was taken (its first statement)
    SELECT * INTO lim FROM cqrs._read_limit();
    IF NOT cqrs._lock('rebuild', projection, true) THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_load.projection;
    p := cqrs._projection(projection);
    IF p.state_function IS NULL THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L declares no state function (cqrs.set_state_function): it is rebuilt from the event log',
            projection));
    ELSIF r.last_position <> 0 OR r.snapshot IS NOT NULL THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has read events already: load state only right after cqrs.rebuild_begin',
            projection));
    END IF;
    PERFORM cqrs._load_state(p.state_function::regproc, quote_ident(r.shadow_schema));
    UPDATE cqrs.rebuilds x
       SET last_position = lim.final_position,
           final_position = greatest(x.final_position, lim.final_position),
           snapshot = pg_current_snapshot(),
           -- read after the snapshot: every transaction it sees took its positions before
           snapshot_position = coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0)
     WHERE x.projection = rebuild_load.projection;
    RETURN lim.final_position;
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
    PERFORM cqrs._rebuild_reads(r);
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
        PERFORM cqrs._rebuild_reads(r);
        SELECT * INTO b FROM cqrs._next_batch(r.last_position, lim.final_position, max_events);
        EXIT WHEN b.n = 0;
        PERFORM cqrs._apply_batch(p.apply_function::regproc, quote_ident(r.shadow_schema), r.last_position, b.end_position);
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Loaded from state: the live projection goes on from the checkpoint without leaving
    -- out what the state holds, so the checkpoint must be past all of that first.
    IF r.snapshot IS NOT NULL AND r.last_position < r.snapshot_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to position %s; events up to %s may still come '
            'from transactions open when its state was loaded: apply them first (cqrs.rebuild_step)',
            projection, r.last_position, r.snapshot_position));
    END IF;
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
        PERFORM cqrs._rebuild_reads(r);
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

-- sql/cqrs/functions/verify.sql
-- Compares a projection's read model with its definition computed from the write model, in
-- this transaction's one snapshot (hence REPEATABLE READ or SERIALIZABLE, refused
-- otherwise; roll it back after). One row per relation: outcome 'equal' or 'different'
-- (differing: rows in one and not the other, counted both ways); or one row without a
-- relation: 'halted' (at failed_position), 'behind' (events this snapshot sees are not
-- applied yet: compare again later), 'undeclared' (no state function: nothing to compare
-- with). A sql or python projection's tables are compared with what its state function
-- fills temporary copies of them with; a materialized view with its own query.
CREATE OR REPLACE FUNCTION cqrs.verify(projection text)
RETURNS TABLE (relation text, outcome text, differing bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    t regclass;
    copy_ text;
    copies text[] := '{}'::text[];
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM cqrs._fail('CQ003', 'cqrs.verify compares under one snapshot: call it in a REPEATABLE READ '
                                    'transaction (BEGIN ISOLATION LEVEL REPEATABLE READ) and roll that back');
    END IF;
    p := cqrs._projection(projection);
    IF p.state = 'halted' THEN
        RETURN QUERY SELECT NULL::text, 'halted'::text, NULL::bigint;
        RETURN;
    END IF;
    -- the read model holds the events up to its checkpoint, every one of which this
    -- snapshot sees: it equals the definition only if the snapshot sees no later one
    IF EXISTS (SELECT 1 FROM cqrs.outbox o WHERE o.position > p.last_position) THEN
        RETURN QUERY SELECT NULL::text, 'behind'::text, NULL::bigint;
        RETURN;
    END IF;
    IF p.kind = 'matview' THEN
        relation := p.matview;
        EXECUTE format('SELECT count(*) FROM ((TABLE %1$s EXCEPT ALL %2$s) UNION ALL (%2$s EXCEPT ALL TABLE %1$s)) d',
                       p.matview, '(' || rtrim(btrim(pg_get_viewdef(p.matview::regclass)), ';') || ')')
           INTO differing;
        outcome := CASE WHEN differing = 0 THEN 'equal' ELSE 'different' END;
        RETURN NEXT;
        RETURN;
    ELSIF p.state_function IS NULL THEN
        RETURN QUERY SELECT NULL::text, 'undeclared'::text, NULL::bigint;
        RETURN;
    END IF;
    -- empty temporary copies, named as the tables, filled by the state function
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        copy_ := format('pg_temp.%I', (SELECT c.relname FROM pg_class c WHERE c.oid = t));
        EXECUTE format('DROP TABLE IF EXISTS %s', copy_);
        EXECUTE format('CREATE TEMPORARY TABLE %s (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)',
                       copy_, t);
        copies := copies || copy_;
    END LOOP;
    PERFORM cqrs._load_state(p.state_function::regproc, 'pg_temp');
    FOR i IN 1 .. cardinality(copies) LOOP
        relation := p.tables[i];
        EXECUTE format('SELECT count(*) FROM ((TABLE %1$s EXCEPT ALL TABLE %2$s) UNION ALL (TABLE %2$s EXCEPT ALL TABLE %1$s)) d',
                       p.tables[i]::regclass, copies[i])
           INTO differing;
        outcome := CASE WHEN differing = 0 THEN 'equal' ELSE 'different' END;
        RETURN NEXT;
        EXECUTE format('DROP TABLE %s', copies[i]);
    END LOOP;
END
$$;

-- sql/cqrs/functions/extend_outbox.sql
-- Keeps the outbox's partitions ahead of its sequence: at least `ahead` empty partitions of
-- partition_size positions beyond the one that holds the last position handed out.
-- Returns the partitions it added. A new partition is attached (a SHARE UPDATE EXCLUSIVE
-- lock on the outbox, which writers do not feel), never created as a partition (an
-- ACCESS EXCLUSIVE one). Events that went to the default partition because no partition
-- was ready move into the first one added, so that every event lies in a range partition
-- that cqrs.prune can drop. The daemon calls this once a minute, and cqrs.prune does.
CREATE OR REPLACE FUNCTION cqrs.extend_outbox(partition_size bigint DEFAULT 1000000, ahead integer DEFAULT 2)
RETURNS SETOF regclass
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    last bigint := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    first_ bigint;
    end_ bigint;
    name_ text;
    overflow boolean;
BEGIN
    PERFORM cqrs._require_range('partition_size', partition_size, 1000, 1000000000);
    PERFORM cqrs._require_range('ahead', ahead, 1, 100);
    SELECT max(b.end_position) INTO end_
      FROM cqrs._outbox_partitions() p CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
    overflow := EXISTS (SELECT 1 FROM cqrs.outbox_default);
    IF overflow THEN
        -- Writers routed there wait for this lock; the partition that takes its events in
        -- ends far enough beyond the last position that none can still be on its way past it.
        LOCK TABLE cqrs.outbox_default IN ACCESS EXCLUSIVE MODE;
        last := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    END IF;
    WHILE overflow OR end_ IS NULL OR end_ <= last + ahead * partition_size LOOP
        first_ := end_;
        end_ := coalesce(first_, 0) + partition_size;
        IF overflow THEN
            end_ := greatest(end_, last + 10000);
        END IF;
        name_ := 'outbox_' || coalesce(first_, 0);
        EXECUTE format('CREATE TABLE cqrs.%I (LIKE cqrs.outbox)', name_);
        IF overflow THEN
            EXECUTE format('INSERT INTO cqrs.%I SELECT * FROM cqrs.outbox_default', name_);
            DELETE FROM cqrs.outbox_default;
            overflow := false;
        END IF;
        EXECUTE format('ALTER TABLE cqrs.outbox ATTACH PARTITION cqrs.%I FOR VALUES FROM (%s) TO (%s)',
                       name_, coalesce(first_::text, 'MINVALUE'), end_);
        RETURN NEXT format('cqrs.%I', name_)::regclass;
    END LOOP;
END
$$;

-- sql/cqrs/functions/prune.sql
-- Drops the outbox's oldest partitions while each holds only history that every reader
-- has passed and whose newest event is older than keep: every projection's checkpoint
-- (and a rebuild's) is at or past its last position, no event in it is parked (a retry
-- reads it again), and it lies wholly below the last position handed out. Stops at the
-- first partition it must keep, so what remains is one unbroken stretch of history
-- (cqrs._history_start). Returns the partitions it dropped, or with dry_run those it
-- would drop, changing nothing (events: as the planner counts them, once analyzed). A partition is dropped whole (DROP TABLE: a brief ACCESS
-- EXCLUSIVE lock on the outbox, waited for at most lock_timeout), never emptied by DELETE.
CREATE OR REPLACE FUNCTION cqrs.prune(keep interval, dry_run boolean DEFAULT false)
RETURNS TABLE (partition text, first_position bigint, end_position bigint, events bigint, bytes bigint,
               newest_event timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    passed bigint;
    last bigint;
    part record;
    bounds record;
BEGIN
    IF keep IS NULL OR keep < interval '0' THEN
        PERFORM cqrs._fail('CQ001', format('keep must be a duration of 0 or more, not %s', coalesce(keep::text, 'null')));
    END IF;
    dry_run := coalesce(dry_run, false);
    IF NOT dry_run THEN
        PERFORM cqrs.extend_outbox();  -- the default partition's events into a range partition
    END IF;
    last := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    SELECT least((SELECT min(p.last_position) FROM cqrs.projections p),
                 (SELECT min(b.last_position) FROM cqrs.rebuilds b),
                 (SELECT min(k.position) - 1 FROM cqrs.parked k WHERE k.outcome = 'parked'),
                 (SELECT l.final_position FROM cqrs._read_limit() l))
      INTO passed;
    FOR part IN SELECT p.partition FROM cqrs._outbox_partitions() p LOOP
        SELECT b.first_position, b.end_position INTO bounds FROM cqrs._partition_bounds(part.partition) b;
        EXIT WHEN bounds.end_position - 1 > passed OR bounds.end_position > last;
        partition := part.partition::text;
        first_position := bounds.first_position;
        end_position := bounds.end_position;
        SELECT o.occurred_at INTO newest_event
          FROM cqrs.outbox o
         WHERE o.position >= coalesce(bounds.first_position, -9223372036854775808) AND o.position < bounds.end_position
         ORDER BY o.position DESC
         LIMIT 1;
        EXIT WHEN newest_event >= now() - keep;
        -- the planner's count once the partition was analyzed (autovacuum does): a prune
        -- costs the same whatever the partitions hold; counted while it never was
        SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END INTO events
          FROM pg_class c WHERE c.oid = part.partition;
        IF events IS NULL THEN
            SELECT count(*) INTO events
              FROM cqrs.outbox o
             WHERE o.position >= coalesce(bounds.first_position, -9223372036854775808) AND o.position < bounds.end_position;
        END IF;
        bytes := pg_total_relation_size(part.partition);
        IF NOT dry_run THEN
            EXECUTE format('DROP TABLE %s', part.partition);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- sql/cqrs/functions/outbox_status.sql
-- The outbox's history, for `cqrs-pg status`: history_start (NULL: it holds every event;
-- else the first position left after cqrs.prune), its range partitions and their size on
-- disk, how many positions are ready beyond the last one handed out (cqrs.extend_outbox
-- keeps two partitions' worth), and the events in the default partition, waiting for the
-- next extend_outbox to move them (it keeps that partition empty).
CREATE OR REPLACE FUNCTION cqrs.outbox_status(
    OUT history_start bigint, OUT partitions integer, OUT bytes bigint, OUT ready_ahead bigint,
    OUT overflow_events bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    history_start := cqrs._history_start();
    SELECT count(*)::integer, coalesce(sum(pg_total_relation_size(p.partition)), 0)::bigint,
           max(b.end_position) - 1 - coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0)
      INTO partitions, bytes, ready_ahead
      FROM cqrs._outbox_partitions() p CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
    bytes := bytes + pg_total_relation_size('cqrs.outbox_default'::regclass);
    SELECT count(*) INTO overflow_events FROM cqrs.outbox_default;
END
$$;

-- sql/cqrs/data/outbox_partitions.sql
-- The outbox's first partitions: from the first position on, and two ahead of it.
SELECT cqrs.extend_outbox();

-- Every table's capture function made again by the new cqrs.capture_changes, from the
-- arguments its triggers record (table, aggregate_type, entity, id_column, version_column;
-- the first shape).
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgrelid::regclass AS tbl,
                    string_to_array(rtrim(encode(g.tgargs, 'escape'), '\000'), '\000') AS args
               FROM pg_catalog.pg_trigger g
              WHERE g.tgname = '_500_outbox_insert' AND NOT g.tgisinternal
              ORDER BY g.tgrelid LOOP
        PERFORM cqrs.capture_changes(t.tbl, t.args[1], t.args[2], t.args[3]::name, nullif(t.args[4], '')::name);
    END LOOP;
END
$$;

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    cqrs.batch_events(text, bigint, bigint),
    cqrs.extend_outbox(bigint, integer),
    cqrs.prune(interval, boolean),
    cqrs.outbox_status()
TO cqrs_listener;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0003';
