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
