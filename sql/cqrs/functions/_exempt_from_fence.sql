-- Leaves this transaction, a materialized view's refresh, out of every projection's fence
-- (cqrs._fence) until it ends, and makes sure it writes no events: it sets cqrs.no_events,
-- which the outbox capture refuses (cqrs._ring_doorbell), and only a transaction that has
-- written nothing yet (no xid) is left out. Then it locks the projection's row of
-- cqrs.refreshing: the lock, held to the end of the transaction, names its xid to _fence.
-- Returns whether it is left out (not if the view has no row: cqrs.register_projection
-- inserts one for every view).
CREATE OR REPLACE FUNCTION cqrs._exempt_from_fence(projection text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RETURN false;  -- may have written events already
    END IF;
    PERFORM set_config('cqrs.no_events', 'on', true);
    PERFORM 1 FROM cqrs.refreshing r WHERE r.projection = _exempt_from_fence.projection FOR UPDATE;
    RETURN FOUND;
END
$$;
