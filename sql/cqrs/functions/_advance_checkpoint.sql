-- Moves a reader's checkpoint, in the caller's transaction (the one that applied the
-- batch): a projection's row, or with rebuild its rebuild's. to_position: the new
-- checkpoint; n: the events applied; refreshed: a matview refresh covered them. A
-- projection's horizon (see cqrs.caught_up) moves up to what cqrs._horizon finds (read
-- thoroughly when no events were applied: a projection with nothing to apply that could
-- not find it after its last batch, cqrs.run_projection). It also keeps what
-- cqrs._read_limit found: the final position, and mark_position (NULL: none) as this
-- transaction's mark, with this transaction's xid, in place of the stored one when that
-- may be replaced (cqrs._mark_replaceable). A halted projection whose checkpoint passes
-- the event it halted at runs again. Shared by every reader of the batch protocol.
CREATE OR REPLACE FUNCTION cqrs._advance_checkpoint(
    projection text, rebuild boolean, to_position bigint, n bigint, refreshed boolean,
    final_position bigint, fence xid8, mark_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    now_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
    new_horizon xid8;
BEGIN
    IF rebuild THEN
        UPDATE cqrs.rebuilds r
           SET last_position = to_position,
               applied_events = r.applied_events + n,
               final_position = greatest(r.final_position, _advance_checkpoint.final_position),
               mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                THEN pg_current_xact_id() ELSE r.mark_xmax END,
               mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                         AND cqrs._mark_replaceable(r.mark_xmax, fence, now_xmax)
                                    THEN _advance_checkpoint.mark_position ELSE r.mark_position END
         WHERE r.projection = _advance_checkpoint.projection;
        RETURN;
    END IF;
    new_horizon := cqrs._horizon(to_position, fence, n = 0);
    UPDATE cqrs.projections c
       SET last_position = to_position,
           applied_events = c.applied_events + n,
           horizon = greatest(c.horizon, new_horizon),
           horizon_position = CASE WHEN new_horizon IS NULL THEN c.horizon_position ELSE to_position END,
           refreshed_at = CASE WHEN refreshed THEN now() ELSE c.refreshed_at END,
           updated_at = now(),
           -- past the event it halted at: running again
           state = CASE WHEN to_position >= c.failed_position THEN 'running' ELSE c.state END,
           failed_position = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_position END,
           failed_error = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_error END,
           failed_sqlstate = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_sqlstate END,
           failed_attempts = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_attempts END,
           failed_at = CASE WHEN to_position >= c.failed_position THEN NULL ELSE c.failed_at END,
           final_position = greatest(c.final_position, _advance_checkpoint.final_position),
           mark_xmax = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                 AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                            THEN pg_current_xact_id() ELSE c.mark_xmax END,
           mark_position = CASE WHEN _advance_checkpoint.mark_position IS NOT NULL
                                     AND cqrs._mark_replaceable(c.mark_xmax, fence, now_xmax)
                                THEN _advance_checkpoint.mark_position ELSE c.mark_position END
     WHERE c.name = projection;
END
$$;
