-- customer_stats' copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.customer_stats_customers (LIKE shop_proj.order_summary_customers INCLUDING ALL);
