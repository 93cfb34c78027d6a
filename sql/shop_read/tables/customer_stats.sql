-- One row per customer: orders placed, cancelled and shipped, and the value of orders
-- not cancelled (numeric: each order's total fits a bigint, as place_order checks, but a
-- customer's sum of them need not, and an overflow would stop the projection).
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_read.customer_stats (
    customer_id          uuid PRIMARY KEY,
    name                 text NOT NULL,
    email                text NOT NULL,
    orders_placed        bigint NOT NULL DEFAULT 0,
    orders_cancelled     bigint NOT NULL DEFAULT 0,
    orders_shipped       bigint NOT NULL DEFAULT 0,
    lifetime_value_cents numeric NOT NULL DEFAULT 0
) WITH (fillfactor = 70);
