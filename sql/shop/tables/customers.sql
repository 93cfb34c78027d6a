CREATE TABLE shop.customers (
    id         uuid PRIMARY KEY,
    email      text NOT NULL,
    name       text NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT customers_email_key UNIQUE (email),
    CONSTRAINT customers_email_lower CHECK (email = pg_catalog.lower(email COLLATE "und-x-icu")),
    CONSTRAINT customers_version_positive CHECK (version >= 1)
);
