-- One row per product: units sold and revenue over lines of orders not cancelled
-- (revenue numeric: each line's value fits a bigint, the sum over all lines need not).
-- Refreshed CONCURRENTLY by the daemon, which needs the unique index on product_id.
CREATE MATERIALIZED VIEW shop_read.product_sales AS
SELECT p.id AS product_id,
       p.sku,
       p.name,
       p.price_cents,
       p.stock,
       coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS units_sold,
       coalesce(sum(l.quantity * l.unit_price_cents) FILTER (WHERE o.status <> 'cancelled'), 0)::numeric AS revenue_cents
  FROM shop.products p
  LEFT JOIN shop.order_lines l ON l.product_id = p.id
  LEFT JOIN shop.orders o ON o.id = l.order_id
 GROUP BY p.id;

CREATE UNIQUE INDEX product_sales_product_id ON shop_read.product_sales (product_id);
