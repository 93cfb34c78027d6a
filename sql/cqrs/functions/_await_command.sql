-- Waits, until deadline at the latest, for the transaction at the fence to end when it is
-- a command's, and returns whether it was one. Every command holds an advisory lock on its
-- command_id until it ends (cqrs._claim_command): a wait for that lock ends as the
-- command's commit releases it, within microseconds, where looking again and again either
-- holds a core (spinning) or sees the commit up to a millisecond late (pg_sleep's finest
-- step). For any other transaction at the fence there is no lock to wait on: false, and
-- the caller looks again as it would have.
-- The lock is taken shared, in a block that always fails: the block's end releases it
-- together with the lock_timeout set for it, so a command's twin (the same command_id)
-- never waits for the caller, and the caller takes no xid (it may still store a mark).
-- Any login may take a lock in the commands' space; it is waited on only while its
-- holder's transaction is at the fence, which holds every reader back anyway, and never
-- past the caller's deadline. Nor past half of deadlock_timeout from the start of the
-- caller's transaction: a wait may close a cycle (a DDL queued behind the caller's reads,
-- the command behind the DDL), which it so leaves before any of them checks for one, so
-- the command is never the deadlock's victim.
CREATE OR REPLACE FUNCTION cqrs._await_command(fence xid8, deadline timestamptz)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key bigint;
    ms bigint := ceil(extract(epoch FROM least(deadline,
                                              transaction_timestamp() + current_setting('deadlock_timeout')::interval / 2)
                                        - clock_timestamp()) * 1000)::bigint;
BEGIN
    IF ms < 1 THEN
        RETURN false;
    END IF;
    -- one read of the lock table: the fence's transaction's backend, and a command lock it holds
    SELECT (array_agg(l.objid::bigint) FILTER (WHERE l.locktype = 'advisory' AND l.objsubid = 2
                                                      AND l.classid = cqrs._lock_space('command')::oid
                                                      AND l.mode = 'ExclusiveLock' AND l.granted))[1]
      INTO key
      FROM pg_locks l
     WHERE l.pid IS NOT NULL
     GROUP BY l.pid
    HAVING bool_or(l.locktype = 'transactionid' AND l.transactionid = xid(fence) AND l.mode = 'ExclusiveLock');
    IF key IS NULL THEN
        RETURN false;
    END IF;
    BEGIN
        PERFORM set_config('lock_timeout', ms || 'ms', true);
        -- objid holds the key's bits as an unsigned oid
        PERFORM pg_advisory_xact_lock_shared(cqrs._lock_space('command'),
                                             (key - CASE WHEN key >= 2147483648 THEN 4294967296 ELSE 0 END)::integer);
        RAISE SQLSTATE '55P03';  -- leave the block, and the lock with it
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    RETURN true;
END
$$;
