-- The events of cqrs.batch(), in no particular order: for set-based apply functions,
-- which group and aggregate the batch anyway and should not pay for a sort (measured: a
-- tenth of a shop projection's apply time). Inlined into the caller's query, like batch.
CREATE FUNCTION cqrs.batch_unordered(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
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
       AND o.tx_id BETWEEN from_tx AND to_tx;
$$;
