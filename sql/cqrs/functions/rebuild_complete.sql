-- A python projection's rebuild, step 3 of 3, in the transaction that claimed the batch
-- (cqrs.rebuild_claim) and let the handler write it to the shadow tables: moves the
-- rebuild's checkpoint past the batch. The arguments are rebuild_claim's answer; a batch
-- that is not after the checkpoint and within what may be read, or a wrong count, is
-- refused.
CREATE OR REPLACE FUNCTION cqrs.rebuild_complete(projection text, to_position bigint, n bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    counted bigint;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind <> 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s projection: cqrs.rebuild_step applies its rebuild',
                                           projection, p.kind));
    END IF;
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_complete.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    IF to_position IS NULL OR to_position <= r.last_position OR to_position > r.final_position
       OR to_position >= r.ahead[1] THEN
        PERFORM cqrs._fail('CQ001', format(
            'batch end %s of the rebuild of projection %L is not after its checkpoint %s and at most %s, '
            'as far as it may read: complete the batch cqrs.rebuild_claim returned',
            coalesce(to_position::text, 'NULL'), projection, r.last_position, least(r.final_position, r.ahead[1] - 1)));
    END IF;
    SELECT count(*) INTO counted
      FROM cqrs.outbox o
     WHERE o.position > r.last_position AND o.position <= to_position;
    IF counted IS DISTINCT FROM n THEN
        PERFORM cqrs._fail('CQ001', format('batch of the rebuild of projection %L holds %s events, not %s',
                                           projection, counted, n));
    END IF;
    PERFORM cqrs._advance_checkpoint(projection, true, to_position, r.ahead, n, false,
                                     r.final_position, NULL, NULL);
END
$$;
