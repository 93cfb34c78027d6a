-- 0002, first: drops and ALTERs that the new definitions below need.
SELECT 1;
-- Read-model sums over many orders in numeric (0001: bigint, which one customer's or one
-- product's orders could overflow, stopping the projection). The view is created anew
-- from sql/ below; the registry follows its new oid in capture.sql's neighbour, after.sql.
ALTER TABLE shop_read.customer_stats ALTER COLUMN lifetime_value_cents TYPE numeric;
DROP MATERIALIZED VIEW shop_read.product_sales;
