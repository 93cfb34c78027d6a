-- The outbox's range partitions, in position order: each holds the positions from
-- first_position (NULL: every position below end_position) up to, not including,
-- end_position. Read from the catalogs, which are the only record of them.
CREATE OR REPLACE FUNCTION cqrs._outbox_partitions()
RETURNS TABLE (partition regclass, first_position bigint, end_position bigint)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.oid::regclass,
           nullif(btrim(b[1], ''''), 'MINVALUE')::bigint,
           btrim(b[2], '''')::bigint
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                     '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') b
     WHERE i.inhparent = 'cqrs.outbox'::regclass
       AND b IS NOT NULL  -- not the default partition
     ORDER BY 3;
$$;
