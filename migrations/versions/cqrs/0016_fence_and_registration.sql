-- cqrs_0016: a transaction that removed a view's projection was left out of the fence
-- (the cascade's delete of its cqrs.refreshing row put its xid where a refresh's lock
-- does), so events it wrote in the same transaction could be passed by every reader
-- before they committed: cqrs.refreshing has no foreign key now, and its rows stay.
-- cqrs.prune and a reader created from the oldest history (register_projection,
-- create_subscription from the beginning) are kept apart by the row of cqrs.pruning: a
-- prune no longer drops history a reader still being created needs.
-- register_projection checks what it stores (a view is a materialized view with a unique
-- index, a table is a table and no other projection's, search_path's schemas exist);
-- errors show a value with line breaks in it on one line (cqrs._shown).

ALTER TABLE cqrs.refreshing DROP CONSTRAINT refreshing_projection_fkey;

-- sql/cqrs/tables/pruning.sql
-- One row, the lock that keeps cqrs.prune and a reader that starts from the oldest
-- history apart. cqrs.prune locks it FOR UPDATE before it reads where every reader is;
-- cqrs.register_projection, and cqrs.create_subscription from the beginning, lock it FOR
-- SHARE before they look at what history is left. A reader still being created is either
-- committed by the time prune reads the checkpoints (and holds its history), or starts
-- after prune has committed and sees what it dropped. A row, not an advisory key: a lock
-- no login outside the engine can take.
CREATE TABLE cqrs.pruning (
    one boolean PRIMARY KEY DEFAULT true CHECK (one)
);
INSERT INTO cqrs.pruning DEFAULT VALUES;

-- sql/cqrs/functions/_shown.sql
-- A value as an error message shows it, on one line: quoted as a literal, or, when it
-- holds a control character (a line break, a tab), as a JSON string, which writes those
-- as escapes (\n, \t, \u0001); the few JSON leaves as they are (U+007F to U+009F) as '?'.
CREATE OR REPLACE FUNCTION cqrs._shown(value text)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN value ~ '[\u0001-\u001f\u007f-\u009f]'
                THEN regexp_replace(to_json(value)::text, '[\u007f-\u009f]', '?', 'g')
                ELSE quote_nullable(value) END;
$$;

-- sql/cqrs/functions/_text_problem.sql
-- What is wrong with a text argument, as a CQ001 message; NULL when nothing is. Wrong:
-- null, blank (once trimmed by cqrs._trim), longer than max_length as given (spaces
-- around it included: a command keeps its arguments as given in cqrs.commands, so no
-- padding may carry more than the bound there) or holding a control character. The value
-- is shown on one line (cqrs._shown). cqrs._require_text raises it; a command raises it itself, so that the
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
        RETURN format('%s must not be blank, got %s', argument, cqrs._shown(left(value, 40)));
    ELSIF length(value) > max_length THEN
        RETURN format('%s must be at most %s characters, spaces around it included, got %s: %s',
                      argument, max_length, length(value), cqrs._shown(left(trimmed, 40) || '...'));
    END IF;
    bad := regexp_instr(trimmed, '[\u0001-\u001f\u007f-\u009f]');
    IF bad > 0 THEN
        RETURN format('%s must not contain control characters, got U+%s at position %s: %s',
                      argument, lpad(upper(to_hex(ascii(substr(trimmed, bad, 1)))), 4, '0'),
                      bad, cqrs._shown(left(trimmed, 40)));
    END IF;
    RETURN NULL;
END
$$;

-- sql/cqrs/functions/_path_schemas.sql
-- The schemas a projection's search_path names, in order, as PostgreSQL reads one: a
-- comma-separated list of names, each plain (folded to lower case) or double-quoted;
-- $user, which names no schema of the projection's own, left out. CQ001 for anything
-- else (an empty name, stray quotes).
CREATE OR REPLACE FUNCTION cqrs._path_schemas(projection text, search_path text)
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    item text;
    schemas text[] := '{}'::text[];
BEGIN
    FOREACH item IN ARRAY coalesce(string_to_array(search_path, ','), '{}'::text[]) LOOP
        item := btrim(item, E' \t\n\r');
        IF item IN ('$user', '"$user"') THEN
            CONTINUE;
        ELSIF item ~ '^"([^"]|"")+"$' THEN
            schemas := schemas || replace(substr(item, 2, length(item) - 2), '""', '"');
        ELSIF item ~ '^[^\s",]+$' THEN
            schemas := schemas || lower(item);
        ELSE
            PERFORM cqrs._fail('CQ001', format(
                'projection %L: search_path must be a list of schemas separated by commas, not %s',
                projection, cqrs._shown(search_path)));
        END IF;
    END LOOP;
    RETURN schemas;
END
$$;

-- sql/cqrs/functions/prune.sql
-- Drops the outbox's oldest partitions while each holds only history that every reader
-- has passed and whose newest event is older than keep: every projection's checkpoint
-- (and a rebuild's) and every subscription's cursor is at or past its last position, no event in it is parked (a retry
-- reads it again), and it lies wholly below the last position handed out. Stops at the
-- first partition it must keep, so what remains is one unbroken stretch of history
-- (cqrs._history_start). Returns the partitions it dropped, or with dry_run those it
-- would drop, changing nothing (events: as the planner counts them, once analyzed). A partition is dropped whole (DROP TABLE: a brief ACCESS
-- EXCLUSIVE lock on the outbox, waited for at most lock_timeout), never emptied by DELETE.
-- It first takes cqrs.pruning's row, so that no reader being created from the oldest
-- history (not committed yet, so not among those it reads) loses it; CQ003 when one takes
-- longer than lock_timeout.
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
        BEGIN
            PERFORM 1 FROM cqrs.pruning FOR UPDATE;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM cqrs._fail('CQ003', format(
                'a projection or subscription is being created from the oldest history (transaction %s holds '
                'cqrs.pruning): prune again once it has ended', (SELECT p.xmax FROM cqrs.pruning p)));
        END;
        PERFORM cqrs.extend_outbox();  -- the default partition's events into a range partition
    END IF;
    last := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    SELECT least((SELECT min(p.last_position) FROM cqrs.projections p),
                 (SELECT min(b.last_position) FROM cqrs.rebuilds b),
                 -- a subscription's cursor passes the events outside its filter too
                 (SELECT min(s.last_position) FROM cqrs.subscriptions s),
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
-- it declares a state function: then `cqrs-pg rebuild` loads it first (it waits for a
-- prune running meanwhile, cqrs.pruning, and sees what that dropped).
-- What it stores is checked first (CQ001): the view is a materialized view with a unique
-- index on plain columns (what REFRESH ... CONCURRENTLY needs), each table a table, each
-- schema of search_path there; CQ003 for a table another projection has already (a
-- rebuild of one would swap out the other's).
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
    pruned_before bigint;
    problem text := cqrs._state_function_problem(state_function);
    nsp text;
    taken record;
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
    IF kind = 'matview' THEN
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = register_projection.matview) <> 'm' THEN
            PERFORM cqrs._fail('CQ001', format('matview projection %L: %s is not a materialized view', name, matview));
        ELSIF NOT EXISTS (SELECT 1 FROM pg_index i
                           WHERE i.indrelid = register_projection.matview AND i.indisunique AND i.indisvalid
                             AND i.indpred IS NULL AND i.indexprs IS NULL) THEN
            PERFORM cqrs._fail('CQ001', format(
                'matview projection %L: %s needs a unique index on its columns, without WHERE or expressions, '
                'to be refreshed CONCURRENTLY', name, matview));
        END IF;
    END IF;
    IF kind <> 'matview' THEN
        SELECT t.t::text AS t_name INTO taken
          FROM unnest(register_projection.tables) t
          JOIN pg_class c ON c.oid = t.t
         WHERE c.relkind NOT IN ('r', 'p')
         LIMIT 1;
        IF FOUND THEN
            PERFORM cqrs._fail('CQ001', format('projection %L: %s is not a table', name, taken.t_name));
        END IF;
        FOREACH nsp IN ARRAY cqrs._path_schemas(name, search_path) LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = nsp) THEN
                PERFORM cqrs._fail('CQ001', format(
                    'projection %L: schema %I of its search_path does not exist', name, nsp));
            END IF;
        END LOOP;
    END IF;
    -- a projection's tables are its own: a rebuild of it builds them anew and swaps them in
    SELECT c.name AS owner, t.t::text AS t_name INTO taken
      FROM unnest(register_projection.tables) t
      JOIN cqrs.projections c
        ON t.t::text = ANY (c.tables) OR t.t::text = c.matview
     LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L: table %s belongs to projection %L already (a rebuild of either would replace it for both)',
            name, taken.t_name, taken.owner));
    END IF;
    SELECT c.name AS owner INTO taken
      FROM cqrs.projections c
     WHERE c.matview = register_projection.matview::text OR register_projection.matview::text = ANY (c.tables);
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', format('projection %L: %s belongs to projection %L already', name, matview, taken.owner));
    END IF;
    -- the oldest history left, with no prune running (cqrs.pruning)
    PERFORM 1 FROM cqrs.pruning FOR SHARE;
    pruned_before := cqrs._history_start();
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
    -- (a removed view's row stays: a row of cqrs.refreshing is never deleted)
    INSERT INTO cqrs.refreshing (projection) SELECT register_projection.name WHERE register_projection.kind = 'matview'
        ON CONFLICT DO NOTHING;
END
$$;

-- sql/cqrs/functions/create_subscription.sql
-- A new subscription: a consumer's place in the outbox, read with cqrs.poll and moved
-- with cqrs.ack. event_types, aggregate_types: only events of these (NULL: all). It
-- starts at the final position (cqrs._read_limit): every event committed after this call
-- is handed out (when other transactions run now, so may a few committed just before);
-- from_beginning: at the oldest event the outbox still holds (cqrs.prune drops history no
-- reader needs). CQ001 for a bad name or filter, CQ003 when the name is taken.
CREATE OR REPLACE FUNCTION cqrs.create_subscription(
    name text, event_types text[] DEFAULT NULL, aggregate_types text[] DEFAULT NULL,
    from_beginning boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    start bigint;
BEGIN
    -- stored trimmed, as they are checked: a type with spaces around it would match nothing
    name := cqrs._require_text('name', name, 200);
    event_types := cqrs._require_types('event_types', event_types);
    aggregate_types := cqrs._require_types('aggregate_types', aggregate_types);
    IF from_beginning THEN
        -- the oldest history left, with no prune running (cqrs.pruning)
        PERFORM 1 FROM cqrs.pruning FOR SHARE;
    END IF;
    SELECT * INTO lim FROM cqrs._read_limit();
    start := CASE WHEN from_beginning THEN greatest(coalesce(cqrs._history_start() - 1, 0), 0)
                  ELSE lim.final_position END;
    INSERT INTO cqrs.subscriptions (name, event_types, aggregate_types, last_position, delivered_position, final_position)
    VALUES (name, event_types, aggregate_types, start, start, lim.final_position)
    ON CONFLICT ON CONSTRAINT subscriptions_pkey DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format(
            'subscription %L already exists: choose another name, or drop it first with cqrs.drop_subscription', name));
    END IF;
END
$$;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0016';

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
