-- Whether a daemon's mark (cqrs.take_mark) is usable: every transaction that ran when it
-- was taken has ended. True when the daemon has none. Waits up to `wait` for it, so that
-- the daemon need not ask again and again; it reads only, and holds no xid meanwhile.
-- While the transaction at the fence is a command's, it waits for that command's lock
-- (cqrs._await_command), which the commit releases: the round starts as the command
-- commits, and no core is held meanwhile. For any other transaction at the fence, for the
-- first `spin` of the wait it looks again at once, then every half millisecond:
-- pg_sleep's finest step is a millisecond, on average half a millisecond after the commit
-- it waits for.
CREATE OR REPLACE FUNCTION cqrs.mark_usable(listener_id text, wait interval DEFAULT '0 s',
                                            spin interval DEFAULT '0 s')
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    started timestamptz := clock_timestamp();
    mark xid8;
    fence xid8;
    plain xid8;
BEGIN
    SELECT l.mark_xmax INTO mark FROM cqrs.listeners l WHERE l.listener_id = mark_usable.listener_id;
    -- each time a statement of its own: a new snapshot
    LOOP
        fence := cqrs._fence(pg_current_snapshot());
        EXIT WHEN mark IS NULL OR mark <= fence;
        IF clock_timestamp() >= started + wait THEN
            RETURN false;
        END IF;
        IF fence IS DISTINCT FROM plain AND cqrs._await_command(fence, started + wait) THEN
            CONTINUE;
        END IF;
        plain := fence;  -- no command's lock to wait on: the lock table is not read again for it
        IF clock_timestamp() >= started + spin THEN
            PERFORM pg_sleep(0.0005);
        END IF;
    END LOOP;
    RETURN true;
END
$$;
