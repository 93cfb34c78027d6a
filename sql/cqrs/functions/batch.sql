-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions), each payload in its type's newest shape (cqrs.register_upcaster). An apply
-- function calls it with the two positions it was given; the planner inlines it, so a
-- set-based apply function that groups the batch pays for no sort (the primary key's
-- range scan is in order already), and it reads only the partitions that hold the batch,
-- whatever the length of the history. A rebuild from state reads only the events of
-- transactions its loaded state does not hold (cqrs._rebuild_reads).
CREATE OR REPLACE FUNCTION cqrs.batch(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    -- Upcast only while some upcaster is registered (that subquery is evaluated once per
    -- call), and only an event of a shape that has one (a primary-key probe).
    SELECT o.position, o.tx_id, o.event_type, o.aggregate_type, o.aggregate_id, o.aggregate_version,
           CASE WHEN NOT (SELECT EXISTS (SELECT 1 FROM cqrs.upcasters)) THEN o.payload
                WHEN EXISTS (SELECT 1 FROM cqrs.upcasters u
                              WHERE u.event_type = o.event_type AND u.from_version = o.payload_version)
                THEN cqrs._upcast(o.event_type, o.payload_version, o.payload)
                ELSE o.payload END,
           o.metadata, o.occurred_at,
           CASE WHEN NOT (SELECT EXISTS (SELECT 1 FROM cqrs.upcasters)) THEN o.payload_version
                WHEN EXISTS (SELECT 1 FROM cqrs.upcasters u
                              WHERE u.event_type = o.event_type AND u.from_version = o.payload_version)
                THEN cqrs._upcast_version(o.event_type, o.payload_version)
                ELSE o.payload_version END
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position
       -- in a rebuild from state, not the events its loaded state holds (cqrs._rebuild_reads);
       -- each subquery is evaluated once per call, not per event
       AND ((SELECT nullif(current_setting('cqrs.loaded_snapshot', true), '')) IS NULL
            OR NOT pg_visible_in_snapshot(o.tx_id, (SELECT current_setting('cqrs.loaded_snapshot')::pg_snapshot)))
     ORDER BY o.position;
$$;
