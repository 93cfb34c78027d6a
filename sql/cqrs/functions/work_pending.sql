-- Whether any of these projections (sql or python) has work: committed events up to the
-- final position that it has not applied, or a mark to leave (cqrs._needs_mark). The
-- daemon's poll while it lingers awake after its last events: reads only, cheaper than a
-- round of cqrs.run_projection calls (0.2 ms each, measured), so the daemon can look every
-- few milliseconds and start a round only when there is work. Materialized views are left
-- out: their refresh waits for its own timer (refresh_interval) anyway.
CREATE OR REPLACE FUNCTION cqrs.work_pending(projections text[])
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
BEGIN
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN cqrs._work_pending(projections, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
END
$$;
