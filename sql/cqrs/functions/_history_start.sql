-- The first position the outbox still holds history from: NULL while it holds all of it,
-- else the first position of its oldest partition (cqrs.prune dropped those before).
CREATE OR REPLACE FUNCTION cqrs._history_start()
RETURNS bigint
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.first_position
      FROM (SELECT p.partition FROM cqrs._outbox_partitions() p LIMIT 1) p
     CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
$$;
