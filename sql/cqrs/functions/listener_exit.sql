-- A daemon that stops cleanly removes its row, so commands stop ringing for it at once.
CREATE OR REPLACE FUNCTION cqrs.listener_exit(listener_id text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM cqrs.listeners l WHERE l.listener_id = listener_exit.listener_id;
$$;
