-- 0004, last: the shop's projections run their new apply functions.
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_order_summary'::regproc WHERE name = 'order_summary';
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_customer_stats'::regproc WHERE name = 'customer_stats';
