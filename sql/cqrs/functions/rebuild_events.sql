-- A python projection's rebuild, step 2 of 3: the events of the batch cqrs.rebuild_claim
-- returned, in (tx_id, position) order, only those of the projection's event_types (NULL:
-- all), as cqrs.batch_events gives the daemon.
CREATE FUNCTION cqrs.rebuild_events(
    projection text, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
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
    RETURN QUERY
        SELECT b.*
          FROM cqrs.batch(from_tx, from_position, to_tx, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.tx_id, b.position;
END
$$;
