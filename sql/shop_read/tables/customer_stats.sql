-- One row per customer: orders placed, cancelled and shipped, and the value of orders
-- not cancelled.
CREATE TABLE shop_read.customer_stats (
    customer_id          uuid PRIMARY KEY,
    name                 text NOT NULL,
    email                text NOT NULL,
    orders_placed        bigint NOT NULL DEFAULT 0,
    orders_cancelled     bigint NOT NULL DEFAULT 0,
    orders_shipped       bigint NOT NULL DEFAULT 0,
    lifetime_value_cents bigint NOT NULL DEFAULT 0
);
