-- A partition of the outbox holds the positions from first_position (NULL: every position
-- below end_position) up to, not including, end_position.
CREATE OR REPLACE FUNCTION cqrs._partition_bounds(partition regclass, OUT first_position bigint, OUT end_position bigint)
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT nullif(btrim(b[1], ''''), 'MINVALUE')::bigint, btrim(b[2], '''')::bigint
      FROM pg_class c
     CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') b
     WHERE c.oid = partition;
$$;
