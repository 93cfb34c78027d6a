-- A row per materialized-view projection (cqrs.register_projection inserts it), locked FOR UPDATE by the transaction that
-- refreshes its view (cqrs._exempt_from_fence): the row's xmax names that transaction to
-- cqrs._fence, which leaves it out. A refresh writes no events, and holds an xid for as
-- long as it runs (0.3 s for product_sales at 100k lines, measured): counted in the fence,
-- it held every projection back that long, once a second.
-- A lock writes the xid into the tuple in place: no new row versions, no bloat.
-- A row is never deleted, nor changed: a transaction that did would put its own xid in
-- the row's xmax, and be left out of the fence like a refresh, events and all. So no
-- foreign key cascades here from cqrs.projections (a projection removed leaves its row,
-- which nothing locks again unless a view of that name is registered anew).
CREATE TABLE cqrs.refreshing (
    projection text PRIMARY KEY
);
