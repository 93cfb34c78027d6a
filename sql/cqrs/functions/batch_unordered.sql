-- The events of cqrs.batch(), in no promised order: for set-based apply functions, which
-- group and aggregate the batch anyway. Inlined into the caller's query, like batch.
CREATE OR REPLACE FUNCTION cqrs.batch_unordered(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position;
$$;

-- The same for an apply function written for the earlier protocol (see cqrs.batch).
CREATE OR REPLACE FUNCTION cqrs.batch_unordered(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT * FROM cqrs.batch_unordered(from_position, to_position);
$$;
