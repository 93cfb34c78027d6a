CREATE TABLE shop.orders (
    id          uuid PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES shop.customers (id),
    status      text NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    version     integer NOT NULL DEFAULT 1,
    CONSTRAINT orders_status CHECK (status IN ('placed', 'cancelled', 'shipped')),
    CONSTRAINT orders_version_positive CHECK (version >= 1)
);
