-- The daemon's look for work while it lingers: cqrs.work_pending and, when there is work,
-- cqrs.take_mark for the round it starts, on one read limit (cqrs._read_limit, read before
-- the mark's write gives this transaction an xid). marked: NULL when there is no work;
-- otherwise take_mark's answer (true: a mark was stored, to wait for with
-- cqrs.mark_usable). settled_position: with no work, and every position handed out final,
-- the last one: until the outbox's sequence moves past it (cqrs.last_position) no work can
-- appear but by an operator's hand (a checkpoint moved, a projection added), so the
-- daemon may look for it with that one read in between. Call it in a transaction of its
-- own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.look_for_work(projections text[], listener_id text,
                                              OUT marked boolean, OUT settled_position bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    IF cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
        marked := cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position,
                                  lim.pending_position);
    ELSIF lim.final_position >= lim.mark_position THEN
        settled_position := lim.mark_position;
    END IF;
END
$$;
