-- Moves a projection's checkpoint past a batch it has applied, in the caller's
-- transaction (the one that applied the batch): last_tx/last_position to the batch end,
-- applied_events by its size n, and the horizon (see cqrs.caught_up) to the fence, or only
-- to the batch's last tx_id when a full batch (full_batch) may have stopped inside that
-- transaction. refreshed: a matview refresh covered it. With to_tx NULL (nothing new below
-- the fence) only the horizon moves up, and only when the last batch may have ended inside
-- a transaction, so an idle daemon writes nothing (and takes no xid).
-- Shared by cqrs.run_projection (sql, matview) and cqrs.complete_batch (python).
CREATE FUNCTION cqrs._advance_checkpoint(
    projection text, to_tx xid8, to_position bigint, n bigint, fence xid8,
    full_batch boolean, refreshed boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    IF to_tx IS NULL THEN
        SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
        IF p.horizon <= p.last_tx AND p.horizon < fence THEN
            UPDATE cqrs.projections c SET horizon = fence, updated_at = now() WHERE c.name = projection;
        END IF;
        RETURN;
    END IF;
    UPDATE cqrs.projections c
       SET last_tx = to_tx,
           last_position = to_position,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, CASE WHEN full_batch THEN to_tx ELSE fence END),
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now()
     WHERE c.name = projection;
END
$$;
