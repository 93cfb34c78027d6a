-- Whether any of these projections (sql or python) has committed events below the fence
-- that it has not applied: the daemon's poll while it lingers awake after its last events.
-- One index probe per projection, reads only: cheaper than a round of cqrs.run_projection
-- calls (0.2 ms each, measured), so the daemon can look every few milliseconds and start a
-- round only when there is work. Materialized views are left out: their refresh waits for
-- its own timer (refresh_interval) anyway.
CREATE FUNCTION cqrs.work_pending(projections text[])
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM cqrs.projections p
         CROSS JOIN (SELECT cqrs._fence() AS fence) f
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND EXISTS (SELECT 1
                         FROM cqrs.outbox o
                        WHERE (o.tx_id, o.position) > (p.last_tx, p.last_position)
                          AND o.tx_id < f.fence));
$$;
