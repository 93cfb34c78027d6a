-- shop_0004: the apply functions leave their plans to the engine (cqrs_0006): generic plans
-- made once per session for small batches, plans made for their bounds for large ones.
ALTER FUNCTION shop_proj.apply_order_summary(bigint, bigint) RESET plan_cache_mode;
ALTER FUNCTION shop_proj.apply_customer_stats(bigint, bigint) RESET plan_cache_mode;
