-- 0002, last: grants and data changes after the new definitions.
SELECT 1;
-- product_sales was created anew (before.sql, then sql/): the registry follows its oid.
UPDATE cqrs.projections SET matview = 'shop_read.product_sales'::regclass WHERE name = 'product_sales';
