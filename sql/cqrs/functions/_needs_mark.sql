-- Whether a reader with nothing to apply should store a mark (cqrs._read_limit): positions
-- were taken beyond the final position and beyond every mark still waiting to become
-- usable, and its own stored mark may be replaced. Without one, events committed while
-- other transactions run would wait for a moment when none does.
CREATE OR REPLACE FUNCTION cqrs._needs_mark(stored_xmax xid8, final_position bigint, fence xid8, mark_position bigint,
                                 pending_position bigint)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT coalesce(mark_position OPERATOR(pg_catalog.>) greatest(final_position, pending_position), false)
           AND cqrs._mark_replaceable(stored_xmax, fence, pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()));
$$;
