-- cqrs.take_mark for a read limit already read (cqrs._read_limit's columns), before this
-- transaction took an xid.
CREATE OR REPLACE FUNCTION cqrs._take_mark(listener_id text, final_position bigint, fence xid8,
                                           mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l cqrs.listeners;
    marking boolean;
BEGIN
    SELECT * INTO l FROM cqrs.listeners x WHERE x.listener_id = _take_mark.listener_id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    marking := cqrs._needs_mark(l.mark_xmax, _take_mark.final_position, fence, _take_mark.mark_position, pending_position);
    IF NOT marking AND _take_mark.final_position <= l.final_position THEN
        RETURN false;  -- nothing new: no write
    END IF;
    -- a mark lost in a crash costs nothing but its use: no need to wait for the disk
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE cqrs.listeners x
       SET final_position = greatest(x.final_position, _take_mark.final_position),
           mark_xmax = CASE WHEN marking THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN marking THEN _take_mark.mark_position ELSE x.mark_position END
     WHERE x.listener_id = _take_mark.listener_id;
    RETURN marking;
END
$$;
