-- A python projection's batch, step 3 of 3, in the transaction that claimed it
-- (cqrs.claim_batch, with the same rebuild) and ran the handler: advances the checkpoint
-- (a rebuild's, or the projection's, with its applied_events and horizon, exactly as
-- cqrs.run_projection does), so the handler's writes and the checkpoint commit together.
-- The arguments are claim_batch's answer; a batch that does not start at the checkpoint,
-- ends beyond what may be read, or holds another number of events is refused.
CREATE OR REPLACE FUNCTION cqrs.complete_batch(
    projection text, to_position bigint, n bigint, max_events integer DEFAULT 10000, rebuild boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    checkpoint bigint;
    final bigint;
    counted bigint;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: %s applies it', projection, p.kind,
                                           CASE WHEN rebuild THEN 'cqrs.rebuild_step' ELSE 'cqrs.run_projection' END));
    END IF;
    IF NOT cqrs._holds_lock(CASE WHEN rebuild THEN 'rebuild' ELSE 'projection' END, projection) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    IF rebuild THEN
        SELECT r.last_position, r.final_position INTO checkpoint, final
          FROM cqrs.rebuilds r WHERE r.projection = complete_batch.projection;
    ELSE
        checkpoint := p.last_position;
        final := p.final_position;
    END IF;
    IF to_position IS NULL OR to_position <= checkpoint OR to_position > final THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of projection %L is not after its checkpoint %s and at most %s, as far as it may read: '
            'complete the batch cqrs.claim_batch returned',
            coalesce(to_position::text, 'NULL'), projection, checkpoint, final));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > checkpoint AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of projection %L holds %s events, not %s', projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, rebuild, to_position, n, false,
                                     final, cqrs._fence(pg_current_snapshot()), NULL);
END
$$;
