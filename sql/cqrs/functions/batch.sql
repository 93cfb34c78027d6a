-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions). An apply function calls it with the two positions it was given.
CREATE OR REPLACE FUNCTION cqrs.batch(from_position bigint, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT *
      FROM cqrs.outbox o
     WHERE o.position > from_position
       AND o.position <= to_position
     ORDER BY o.position;
$$;

-- The same for an apply function written for the earlier protocol
-- f(from_tx, from_position, to_tx, to_position): the transaction ids are not needed.
CREATE OR REPLACE FUNCTION cqrs.batch(from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS SETOF cqrs.outbox
LANGUAGE sql
STABLE
AS $$
    SELECT * FROM cqrs.batch(from_position, to_position);
$$;
