-- A daemon says it is alive until now() + ttl, and whether it is about to sleep (then
-- commands ring the doorbell for it). Also forgets daemons that died long ago. Bounded,
-- since any login of cqrs_listener may call it: an id of at most 200 characters, a ttl
-- from 1 second to 1 day (a sleeping row costs every command a NOTIFY until it expires).
CREATE OR REPLACE FUNCTION cqrs.listener_heartbeat(listener_id text, sleeping boolean, ttl interval)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM cqrs._require_text('listener_id', listener_id, 200);
    IF ttl IS NULL OR ttl < interval '1 second' OR ttl > interval '1 day' THEN
        PERFORM cqrs._fail('CQ001', format('ttl must be from 1 second to 1 day, got %s', coalesce(ttl::text, 'NULL')));
    END IF;
    IF sleeping IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'sleeping must not be null');
    END IF;
    DELETE FROM cqrs.listeners l WHERE l.expires_at < now() - interval '1 hour';
    INSERT INTO cqrs.listeners AS l (listener_id, pid, sleeping, expires_at)
    VALUES (listener_id, pg_backend_pid(), sleeping, now() + ttl)
    ON CONFLICT ON CONSTRAINT listeners_pkey DO UPDATE
        SET pid = excluded.pid, sleeping = excluded.sleeping, expires_at = excluded.expires_at;
END
$$;
