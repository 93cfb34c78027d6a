-- The events of one batch: those after from_position up to and including to_position, in
-- position order, the order every reader gets them in (per aggregate, the order of its
-- versions). An apply function calls it with the two positions it was given; the planner
-- inlines it, so a set-based apply function that groups the batch pays for no sort (the
-- primary key's range scan is in order already).
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
