-- Whether a daemon's mark (cqrs.take_mark) is usable: every transaction that ran when it
-- was taken has ended. True when the daemon has none. Waits up to `wait` for it, looking
-- every half millisecond, so that the daemon need not ask again and again; it reads only,
-- and holds no xid meanwhile.
CREATE OR REPLACE FUNCTION cqrs.mark_usable(listener_id text, wait interval DEFAULT '0 s')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + wait;
    mark xid8;
BEGIN
    SELECT l.mark_xmax INTO mark FROM cqrs.listeners l WHERE l.listener_id = mark_usable.listener_id;
    -- each time a statement of its own: a new snapshot
    WHILE mark IS NOT NULL AND mark > cqrs._fence(pg_current_snapshot()) LOOP
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.0005);
    END LOOP;
    RETURN true;
END
$$;
