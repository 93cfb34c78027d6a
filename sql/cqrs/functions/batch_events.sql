-- A python projection's batch, step 2 of 3: the events of the batch this transaction
-- claimed with cqrs.claim_batch, in position order, only those of the projection's
-- event_types (NULL: all), with the outbox's columns. SECURITY DEFINER: the daemon's
-- role needs no access to cqrs.outbox itself.
CREATE OR REPLACE FUNCTION cqrs.batch_events(projection text, from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    IF NOT (cqrs._holds_lock('projection', projection) OR cqrs._holds_lock('rebuild', projection)) THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not claimed by this transaction: call cqrs.claim_batch first', projection));
    END IF;
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_position, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types);
END
$$;
