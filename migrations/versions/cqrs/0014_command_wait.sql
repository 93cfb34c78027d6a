-- cqrs_0014: a daemon's round waiting for its mark while a command committed spun for up
-- to 3 ms, holding a core the command needed, then looked every millisecond; a lingering
-- daemon looked for work every half millisecond after a round. While the transaction at
-- the fence is a command's, cqrs.mark_usable now waits for the command's own advisory
-- lock (cqrs._await_command), which its commit releases, and cqrs.look_for_work given a
-- wait does the same when it finds positions not final yet: the round starts as the
-- command commits, and waiting costs nothing.

-- sql/cqrs/functions/_await_command.sql
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

-- sql/cqrs/functions/mark_usable.sql
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

-- sql/cqrs/functions/look_for_work.sql
-- The daemon's look for work while it lingers: cqrs.work_pending and, when there is work,
-- cqrs.take_mark for the round it starts, on one read limit (cqrs._read_limit, read before
-- the mark's write gives this transaction an xid). marked: NULL when there is no work;
-- otherwise take_mark's answer (true: a mark was stored, to wait for with
-- cqrs.mark_usable). settled_position: with no work, and every position handed out final,
-- the last one: until the outbox's sequence moves past it (cqrs.last_position) no work can
-- appear but by an operator's hand (a checkpoint moved, a projection added).
-- With settled (an earlier look's settled_position), it first waits up to `wait` for the
-- sequence to hand out another position, looking at it every millisecond or so (the
-- finest sleep there is): a few microseconds a look here, where a look from the daemon
-- costs a round trip, about a tenth of a millisecond of CPU on each side (measured). A
-- lingering daemon waits so between commands instead of asking again and again.
-- With settled and no wait, it only glances at the sequence while that has not moved,
-- answering settled_position = settled (what cqrs.last_position costs), and looks in full
-- once it has, taking the round's mark in the same call. An operator's hand (a checkpoint
-- moved, a projection added) is seen by a look in full, as any wait ends.
-- With wait, a look in full that finds no work, and positions handed out that are not
-- final yet (a command in flight that a mark stored already covers), waits up to the
-- same deadline for the command at the fence to end (cqrs._await_command), and looks
-- again: a lingering daemon sees a command's events as it commits, in one call.
-- Call it in a transaction of its own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.look_for_work(projections text[], listener_id text, settled bigint DEFAULT NULL,
                                              wait interval DEFAULT '0 s',
                                              OUT marked boolean, OUT settled_position bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    deadline timestamptz;
BEGIN
    IF wait IS NULL OR wait < interval '0 s' OR wait > interval '1 min' THEN
        PERFORM cqrs._fail('CQ001', format('wait must be between 0 s and 1 min, got %s', coalesce(wait::text, 'null')));
    END IF;
    deadline := clock_timestamp() + wait;
    IF settled IS NOT NULL AND wait > interval '0 s' THEN
        WHILE coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) = settled
              AND clock_timestamp() < deadline LOOP
            PERFORM pg_sleep(0.0002);  -- a millisecond: the timeout of a wait is whole ms
        END LOOP;
    ELSIF settled IS NOT NULL
          AND coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) = settled THEN
        settled_position := settled;
        RETURN;
    END IF;
    LOOP
        -- a statement of its own: a snapshot taken after the wait
        SELECT * INTO lim FROM cqrs._read_limit();
        IF cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
            marked := cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position,
                                      lim.pending_position);
            RETURN;
        ELSIF lim.final_position >= lim.mark_position THEN
            settled_position := lim.mark_position;
            RETURN;
        END IF;
        -- positions handed out, not final yet, and already marked: until the command at
        -- the fence ends, if it is one
        EXIT WHEN NOT cqrs._await_command(lim.fence, deadline);
    END LOOP;
END
$$;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0014';

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
