-- customer_stats' view of each order: its latest status (by version) and its total.
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_proj.customer_stats_orders (
    order_id    uuid PRIMARY KEY,
    customer_id uuid NOT NULL,
    status      text NOT NULL,
    total_cents bigint NOT NULL DEFAULT 0,
    version     integer NOT NULL
) WITH (fillfactor = 70);

-- named as PostgreSQL would name it (see shop_read/tables/order_summary.sql)
CREATE INDEX customer_stats_orders_customer_id_idx ON shop_proj.customer_stats_orders (customer_id);
