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
