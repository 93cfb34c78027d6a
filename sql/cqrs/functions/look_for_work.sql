-- The daemon's look for work while it lingers: cqrs.work_pending and, when there is work,
-- cqrs.take_mark for the round it starts, on one read limit (cqrs._read_limit, read before
-- the mark's write gives this transaction an xid). NULL: no work; otherwise take_mark's
-- answer (true: a mark was stored, to wait for with cqrs.mark_usable). Call it in a
-- transaction of its own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.look_for_work(projections text[], listener_id text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    IF NOT cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position) THEN
        RETURN NULL;
    END IF;
    RETURN cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
END
$$;
