-- The fence (cqrs._fence) now, and whether committed events wait above it (held back by an open
-- transaction): the daemon's stall watch. Reads only, so the caller takes no xid.
CREATE OR REPLACE FUNCTION cqrs.fence_status(OUT fence xid8, OUT held boolean)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.fence, EXISTS (SELECT 1 FROM cqrs.outbox o WHERE o.tx_id >= f.fence)
      FROM (SELECT cqrs._fence() AS fence) f;
$$;
