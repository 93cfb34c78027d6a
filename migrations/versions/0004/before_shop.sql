-- The shop's apply functions take (from_position, to_position) now: created anew below.
DROP FUNCTION shop_proj.apply_order_summary(xid8, bigint, xid8, bigint);
DROP FUNCTION shop_proj.apply_customer_stats(xid8, bigint, xid8, bigint);
