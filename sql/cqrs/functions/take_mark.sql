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
    l cqrs.listeners;
    marking boolean;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO l FROM cqrs.listeners x WHERE x.listener_id = take_mark.listener_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    marking := cqrs._needs_mark(l.mark_xmax, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
    IF NOT marking AND lim.final_position <= l.final_position THEN
        RETURN false;  -- nothing new: no write
    END IF;
    -- a mark lost in a crash costs nothing but its use: no need to wait for the disk
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE cqrs.listeners x
       SET final_position = greatest(x.final_position, lim.final_position),
           mark_xmax = CASE WHEN marking THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN marking THEN lim.mark_position ELSE x.mark_position END
     WHERE x.listener_id = take_mark.listener_id;
    RETURN marking;
END
$$;
