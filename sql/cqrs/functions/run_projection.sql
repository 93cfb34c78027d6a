-- Applies the next batch of one projection in the caller's transaction and advances its
-- checkpoint in that same transaction (sql and matview projections; a python projection
-- is run by the daemon with cqrs.claim_batch and cqrs.complete_batch). Returns what it did:
--   applied      events applied (or, for a matview, covered by the refresh)
--   more         a full batch was applied: call again at once
--   busy         another daemon is running this projection right now
--   retry_after  a matview refresh is due but held back by refresh_interval: seconds left
--
-- Events are read in position order, which is each aggregate's version order, and only up
-- to the final position (cqrs._read_limit): no transaction can add an event there any
-- more, so none can appear behind the checkpoint. A transaction that commits late is
-- delayed, never skipped, and writers take no lock for it. See sql/cqrs/DESIGN.md.
CREATE OR REPLACE FUNCTION cqrs.run_projection(
    projection text,
    max_events integer DEFAULT 10000,
    refresh_interval interval DEFAULT '1 second')
RETURNS TABLE (applied bigint, more boolean, busy boolean, retry_after double precision)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    lim record;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a python projection: the daemon runs its handler (cqrs.claim_batch, cqrs.complete_batch)',
            projection));
    END IF;
    -- Before any lock, with no xid yet: the position _read_limit reads can be a mark.
    SELECT * INTO lim FROM cqrs._read_limit();
    RETURN QUERY SELECT * FROM cqrs._run_batch(p, max_events, refresh_interval, lim.final_position, lim.fence,
                                              lim.mark_position, lim.pending_position);
END
$$;
