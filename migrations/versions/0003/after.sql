-- Room for in-place (HOT) updates on the read tables that every batch updates (new pages
-- only; a rebuild rewrites them all).
ALTER TABLE shop_read.customer_stats SET (fillfactor = 70);
ALTER TABLE shop_read.order_summary SET (fillfactor = 70);
ALTER TABLE shop_proj.customer_stats_orders SET (fillfactor = 70);
