-- A python projection's rebuild, step 2 of 3: the events of the batch cqrs.rebuild_claim
-- returned, in position order, only those of the projection's event_types (NULL: all),
-- as cqrs.batch_events gives the daemon.
CREATE OR REPLACE FUNCTION cqrs.rebuild_events(projection text, from_position bigint, to_position bigint)
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
          FROM cqrs.batch(from_position, to_position) b
         WHERE p.event_types IS NULL OR b.event_type = ANY (p.event_types)
         ORDER BY b.position;
END
$$;
