-- order_summary's copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.order_summary_customers (
    customer_id uuid PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    version     integer NOT NULL
);
