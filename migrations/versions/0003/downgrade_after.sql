-- 0003 undone, last: nothing calls these any more.
DROP FUNCTION cqrs.work_pending(text[]);
DROP FUNCTION cqrs._exempt_from_fence(text);
DROP FUNCTION cqrs._fence();
DROP FUNCTION cqrs._left_out_of_fence(xid);
DROP TABLE cqrs.refreshing;
ALTER TABLE shop_read.customer_stats RESET (fillfactor);
ALTER TABLE shop_read.order_summary RESET (fillfactor);
ALTER TABLE shop_proj.customer_stats_orders RESET (fillfactor);
