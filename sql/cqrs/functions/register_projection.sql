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
