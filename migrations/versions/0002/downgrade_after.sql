-- 0002 undone, last: product_sales (restored above as 0001 made it) gets its grant back
-- and the registry its new oid.
GRANT SELECT ON shop_read.product_sales TO cqrs_reader;
UPDATE cqrs.projections SET matview = 'shop_read.product_sales'::regclass WHERE name = 'product_sales';
