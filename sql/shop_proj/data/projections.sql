-- The shop's three projections.
SELECT cqrs.register_projection('order_summary', 'sql', 'shop_proj.apply_order_summary');
SELECT cqrs.register_projection('customer_stats', 'sql', 'shop_proj.apply_customer_stats');
SELECT cqrs.register_projection(
    'product_sales', 'matview',
    matview => 'shop_read.product_sales',
    event_types => ARRAY['product.created', 'product.updated',
                         'order.created', 'order.updated', 'order_line.created']);
