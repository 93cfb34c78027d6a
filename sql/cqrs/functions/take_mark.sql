-- A daemon's mark for its next round (see cqrs._read_limit): the last position handed out,
-- read before this transaction takes its xid, stored in the daemon's row of
-- cqrs.listeners with that xid. Once the transactions running now have ended
-- (cqrs.mark_usable), a round reads everything committed up to here, instead of what the
-- marks of the round before cover: under steady writes that is one round fresher. When
-- nothing runs now, that position is final at once: stored as the row's final position,
-- so that the round's projections read up to it whatever they find running then (each
-- other's batches).
-- Returns whether it stored a mark to wait for: not when nothing beyond the final
-- position needs one, or when the daemon's mark still waits (cqrs._needs_mark). Call it
-- in a transaction of its own, READ COMMITTED.
CREATE OR REPLACE FUNCTION cqrs.take_mark(listener_id text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN cqrs._take_mark(listener_id, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
END
$$;
