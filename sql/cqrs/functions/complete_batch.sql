-- A python projection's daemon, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.claim_batch) and ran the handler: advances the checkpoint, applied_events and
-- horizon exactly as cqrs.run_projection does for a sql projection, so the handler's
-- writes and the checkpoint commit together. The arguments are claim_batch's answer; a
-- batch that does not start at the checkpoint, ends beyond what may be read, or holds
-- another number of events is refused.
CREATE OR REPLACE FUNCTION cqrs.complete_batch(projection text, to_position bigint, n bigint, max_events integer)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    counted bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.run_projection applies it',
                                           projection, p.kind));
    END IF;
    IF NOT cqrs._holds_projection_lock(projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    IF to_position IS NULL OR to_position <= p.last_position OR to_position > p.final_position
       OR to_position >= p.ahead[1] THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of projection %L is not after its checkpoint %s and at most %s, as far as it may read: '
            'complete the batch cqrs.claim_batch returned',
            coalesce(to_position::text, 'NULL'), projection, p.last_position, least(p.final_position, p.ahead[1] - 1)));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > p.last_position AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, false, to_position, p.ahead, n, false,
                                     p.final_position, cqrs._fence(pg_current_snapshot()), NULL);
END
$$;
