-- The shop's three projections.
SELECT cqrs.register_projection(
    'order_summary', 'sql', 'shop_proj.apply_order_summary',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.order_summary', 'shop_proj.order_summary_customers']::regclass[],
    state_function => 'shop_proj.load_order_summary');
SELECT cqrs.register_projection(
    'customer_stats', 'sql', 'shop_proj.apply_customer_stats',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.customer_stats', 'shop_proj.customer_stats_customers',
                    'shop_proj.customer_stats_orders']::regclass[],
    state_function => 'shop_proj.load_customer_stats');
SELECT cqrs.register_projection(
    'product_sales', 'matview',
    matview => 'shop_read.product_sales',
    event_types => ARRAY['product.created', 'product.updated',
                         'order.created', 'order.updated', 'order_line.created']);
