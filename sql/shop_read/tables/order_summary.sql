-- One row per order with its totals and its customer's current name and email.
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_read.order_summary (
    order_id       uuid PRIMARY KEY,
    customer_id    uuid NOT NULL,
    customer_name  text,
    customer_email text,
    status         text NOT NULL,
    line_count     integer NOT NULL DEFAULT 0,
    item_count     bigint NOT NULL DEFAULT 0,
    total_cents    bigint NOT NULL DEFAULT 0,
    placed_at      timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    version        integer NOT NULL
) WITH (fillfactor = 70);

-- named as PostgreSQL would name it, so that a rebuild's copy (LIKE ... INCLUDING ALL)
-- gets the same name
CREATE INDEX order_summary_customer_id_idx ON shop_read.order_summary (customer_id);
