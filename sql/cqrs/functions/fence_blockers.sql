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
