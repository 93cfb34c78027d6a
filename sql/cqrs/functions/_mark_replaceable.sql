-- Whether a reader may replace the mark it stored (stored_xmax) with a new one: when it
-- has none, when it is usable already (at or below the fence), or when it cannot be from
-- this cluster (at or above the xmax now, as after a logical restore). One that still
-- waits is kept: under steady writes, marks replaced every round would never become usable.
CREATE OR REPLACE FUNCTION cqrs._mark_replaceable(stored_xmax xid8, fence xid8, now_xmax xid8)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT stored_xmax IS NULL OR stored_xmax OPERATOR(pg_catalog.<=) fence
           OR stored_xmax OPERATOR(pg_catalog.>=) now_xmax;
$$;
