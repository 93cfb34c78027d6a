-- Whether the session that began with backend pid at `started` still runs (pids are
-- reused: the start time tells two sessions apart; when the owner may not see it, NULL,
-- the pid alone).
CREATE OR REPLACE FUNCTION cqrs._session_alive(pid integer, started timestamptz)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_stat_get_activity(_session_alive.pid) a
                    WHERE a.backend_start IS NOT DISTINCT FROM started OR started IS NULL);
$$;
