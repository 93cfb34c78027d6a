-- The events of one projection batch: those after the checkpoint up to and including
-- the batch end, in the order every projection applies them.
CREATE OR REPLACE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE (o.tx_id, o.position) > (from_tx, from_position)
       AND (o.tx_id, o.position) <= (to_tx, to_position)
       -- implied by the above; the planner estimates a batch's size from this, not from
       -- the row comparisons (a 5-event batch was estimated at 41,000 rows)
       AND o.tx_id BETWEEN from_tx AND to_tx
     ORDER BY o.tx_id, o.position;
$$;
