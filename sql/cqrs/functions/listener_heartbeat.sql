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
