-- The outbox's range partitions, in position order: by the first position in each one's
-- name (cqrs.extend_outbox names them), read from the catalogs, which are the only record
-- of them. Their bounds: cqrs._partition_bounds, deparsed only for the partitions a
-- caller looks at (cqrs.prune stops at the first it keeps).
CREATE OR REPLACE FUNCTION cqrs._outbox_partitions()
RETURNS TABLE (partition regclass)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'cqrs.outbox'::regclass
       AND c.relname ~ '^outbox_[0-9]+$'  -- not the default partition
     ORDER BY substr(c.relname, 8)::numeric;
$$;
