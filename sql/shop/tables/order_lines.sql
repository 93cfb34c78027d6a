CREATE TABLE shop.order_lines (
    order_id         uuid NOT NULL REFERENCES shop.orders (id),
    line_no          integer NOT NULL,
    product_id       uuid NOT NULL REFERENCES shop.products (id),
    quantity         integer NOT NULL,
    unit_price_cents bigint NOT NULL,
    CONSTRAINT order_lines_pkey PRIMARY KEY (order_id, line_no),
    CONSTRAINT order_lines_quantity_positive CHECK (quantity > 0),
    CONSTRAINT order_lines_price_not_negative CHECK (unit_price_cents >= 0)
);
