-- The fence (cqrs._fence) now, and whether committed events wait above it, held back by
-- an open transaction (no reader may read them until it ends): the daemon's stall watch.
-- Reads only, so the caller takes no xid.
CREATE OR REPLACE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence,
           EXISTS (SELECT 1
                     FROM cqrs.outbox o
                    WHERE o.position > greatest((SELECT max(p.final_position) FROM cqrs.projections p), 0)
                      AND o.tx_id >= f.fence)
      FROM (SELECT cqrs._fence(pg_current_snapshot()) AS fence) f;
$$;
