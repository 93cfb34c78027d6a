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
