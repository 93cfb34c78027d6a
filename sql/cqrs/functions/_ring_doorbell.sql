-- The doorbell, rung by the outbox capture after each statement that appended events:
-- NOTIFY, but only while a daemon has said it is asleep (cqrs.listeners). A NOTIFY
-- serializes the commits of every notifying transaction in the cluster, so commands
-- under load, with the daemon awake, never send one (see DESIGN.md, wake-up).
-- A function of its own so that `cqrs-pg bench` can swap it for its baselines.
CREATE FUNCTION cqrs._ring_doorbell()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
END
$$;
