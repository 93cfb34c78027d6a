-- sql/shop/schema.sql
-- The example domain's write model: normalized tables, private to the command functions.
CREATE SCHEMA shop;

-- sql/shop/types/closing.sql
-- What shop._close_order returns: the receipt, or a refusal (errcode, problem) for the
-- command to raise.
CREATE TYPE shop.closing AS (
    receipt cqrs.receipt,
    errcode text,
    problem text
);

-- sql/shop/tables/customers.sql
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

-- sql/shop/tables/products.sql
CREATE TABLE shop.products (
    id          uuid PRIMARY KEY,
    sku         text NOT NULL,
    name        text NOT NULL,
    price_cents bigint NOT NULL,
    stock       integer NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT products_sku_key UNIQUE (sku),
    CONSTRAINT products_price_not_negative CHECK (price_cents >= 0),
    CONSTRAINT products_stock_not_negative CHECK (stock >= 0),
    CONSTRAINT products_version_positive CHECK (version >= 1)
);

-- sql/shop/tables/orders.sql
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

-- sql/shop/tables/order_lines.sql
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

-- sql/shop/triggers/outbox.sql
-- Every change to the write model appends events to cqrs.outbox in the same transaction.
-- Order lines belong to their order's aggregate; they are only ever added with version 1.
SELECT cqrs.capture_changes('shop.customers', 'customer', 'customer', 'id', 'version');
SELECT cqrs.capture_changes('shop.products', 'product', 'product', 'id', 'version');
SELECT cqrs.capture_changes('shop.orders', 'order', 'order', 'id', 'version');
SELECT cqrs.capture_changes('shop.order_lines', 'order', 'order_line', 'order_id');

-- sql/shop/functions/_normalize_email.sql
-- An email address trimmed and lower-cased; check it with shop._email_problem first.
-- Lower-cased with ICU's root collation, so the result does not depend on the database's
-- locale (lower() under locale C leaves non-ASCII letters alone).
CREATE OR REPLACE FUNCTION shop._normalize_email(email text)
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT pg_catalog.lower(cqrs._trim(email) COLLATE pg_catalog."und-x-icu");
$$;

-- sql/shop/functions/_email_problem.sql
-- What is wrong with an email argument, as a CQ001 message (cqrs._text_problem, or not
-- like local@domain.tld once normalized); NULL when nothing is.
CREATE OR REPLACE FUNCTION shop._email_problem(email text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._text_problem('email', email, 320);
BEGIN
    IF problem IS NULL AND shop._normalize_email(email) !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
        problem := format('email is not a valid address: %L', email);
    END IF;
    RETURN problem;
END
$$;

-- sql/shop/functions/_parse_order_lines.sql
-- Validates place_order's lines: a JSON array of 1 to 100 {"sku": text, "quantity": integer > 0},
-- each sku once. Returns them as two arrays in line order, or (arrays NULL) `problem`: the
-- CQ001 message naming the first bad entry, which place_order raises.
CREATE OR REPLACE FUNCTION shop._parse_order_lines(lines jsonb, OUT skus text[], OUT quantities integer[],
                                                   OUT problem text)
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    line jsonb;
    i integer := 0;
    sku text;
    quantity numeric;
    unknown text;
BEGIN
    IF lines IS NULL THEN
        problem := 'lines must not be null';
        RETURN;
    ELSIF jsonb_typeof(lines) <> 'array' THEN
        problem := format('lines must be a JSON array, got %s: %s', jsonb_typeof(lines), left(lines::text, 80));
        RETURN;
    ELSIF jsonb_array_length(lines) NOT BETWEEN 1 AND 100 THEN
        problem := format('lines must hold 1 to 100 entries, got %s', jsonb_array_length(lines));
        RETURN;
    END IF;

    skus := '{}';
    quantities := '{}';
    FOR line IN SELECT value FROM jsonb_array_elements(lines) LOOP
        i := i + 1;
        IF jsonb_typeof(line) <> 'object' THEN
            problem := format('lines[%s] must be an object, got %s', i, left(line::text, 80));
        ELSIF jsonb_typeof(line -> 'sku') IS DISTINCT FROM 'string' THEN
            problem := format('lines[%s].sku must be a string, got %s',
                              i, coalesce(left((line -> 'sku')::text, 80), 'nothing'));
        ELSIF jsonb_typeof(line -> 'quantity') IS DISTINCT FROM 'number' THEN
            problem := format('lines[%s].quantity must be a number, got %s',
                              i, coalesce(left((line -> 'quantity')::text, 80), 'nothing'));
        END IF;
        EXIT WHEN problem IS NOT NULL;
        -- A misspelt or extra key ("qty", "price") is a mistake, not something to ignore.
        SELECT k INTO unknown FROM jsonb_object_keys(line) k WHERE k NOT IN ('sku', 'quantity') LIMIT 1;
        IF FOUND THEN
            problem := format('lines[%s] has an unknown key %L: only "sku" and "quantity" are allowed',
                              i, left(unknown, 40));
            EXIT;
        END IF;
        problem := cqrs._text_problem(format('lines[%s].sku', i), line ->> 'sku', 100);
        EXIT WHEN problem IS NOT NULL;
        sku := cqrs._trim(line ->> 'sku');
        quantity := (line -> 'quantity')::numeric;
        IF quantity <> trunc(quantity) OR quantity < 1 OR quantity > 2147483647 THEN
            problem := format('lines[%s].quantity must be a whole number from 1 to 2147483647, got %s',
                              i, left((line -> 'quantity')::text, 40));
        ELSIF sku = ANY (skus) THEN
            problem := format('lines[%s]: sku %L appears more than once', i, sku);
        END IF;
        EXIT WHEN problem IS NOT NULL;
        skus := skus || sku;
        quantities := quantities || quantity::integer;
    END LOOP;
    IF problem IS NOT NULL THEN
        skus := NULL;
        quantities := NULL;
    END IF;
END
$$;

-- sql/shop/functions/_close_order.sql
-- Moves a placed order to its final status (cancelled gives the stock back). Shared by
-- cancel_order and ship_order, which differ only in the status they set. A refusal is
-- returned (`errcode`, `problem`), before anything is written, for the command to raise.
CREATE OR REPLACE FUNCTION shop._close_order(command text, command_id uuid, order_id uuid, expected_version integer,
                                             new_status text)
RETURNS shop.closing
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_version integer;
    claim cqrs.claim;
    result shop.closing;
BEGIN
    result.problem := coalesce(cqrs._id_problem('order_id', order_id),
                               CASE WHEN expected_version IS NOT NULL  -- versions start at 1
                                    THEN cqrs._range_problem('expected_version', expected_version, 1) END,
                               cqrs._id_problem('command_id', command_id));
    IF result.problem IS NOT NULL THEN
        result.errcode := 'CQ001';
        RETURN result;
    END IF;
    claim := cqrs._claim_command(command_id, command,
                                 jsonb_build_object('order_id', order_id, 'expected_version', expected_version));
    IF claim.conflict IS NOT NULL THEN
        result.errcode := 'CQ005';
        result.problem := claim.conflict;
        RETURN result;
    ELSIF (claim.receipt).duplicate THEN
        result.receipt := claim.receipt;
        RETURN result;
    END IF;

    SELECT o.status, o.version INTO v_status, v_version
      FROM shop.orders o
     WHERE o.id = _close_order.order_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        result.errcode := 'CQ002';
        result.problem := format('order %s does not exist', order_id);
        RETURN result;
    END IF;
    result.problem := cqrs._version_problem('order', order_id, expected_version, v_version);
    IF result.problem IS NOT NULL THEN
        result.errcode := 'CQ004';
        RETURN result;
    END IF;
    IF v_status <> 'placed' THEN
        result.errcode := 'CQ003';
        result.problem := format('order %s is %s: only a placed order can be %s', order_id, v_status, new_status);
        RETURN result;
    END IF;

    IF new_status = 'cancelled' THEN
        PERFORM 1
          FROM shop.products p
         WHERE p.id IN (SELECT l.product_id FROM shop.order_lines l WHERE l.order_id = _close_order.order_id)
         ORDER BY p.id
           FOR NO KEY UPDATE;
        UPDATE shop.products p
           SET stock = p.stock + l.quantity, version = p.version + 1
          FROM shop.order_lines l
         WHERE l.order_id = _close_order.order_id
           AND p.id = l.product_id;
    END IF;

    UPDATE shop.orders o
       SET status = new_status, updated_at = now(), version = o.version + 1
     WHERE o.id = _close_order.order_id
    RETURNING o.version INTO v_version;
    result.receipt := cqrs._finish_command(command_id, order_id, v_version);
    RETURN result;
END
$$;

-- sql/shop/functions/register_customer.sql
-- Registers a customer under a unique (case-insensitive) email address.
CREATE OR REPLACE FUNCTION shop.register_customer(command_id uuid, email text, name text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(shop._email_problem(email),
                             cqrs._text_problem('name', name, 200),
                             cqrs._id_problem('command_id', command_id));
    v_email text := shop._normalize_email(email);
    v_name text := cqrs._trim(name);
    v_id uuid := gen_random_uuid();
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'register_customer',
                                 jsonb_build_object('email', email, 'name', name));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    INSERT INTO shop.customers (id, email, name)
    VALUES (v_id, v_email, v_name)
    ON CONFLICT ON CONSTRAINT customers_email_key DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003', MESSAGE = format('email %L is already registered', v_email);
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/rename_customer.sql
-- Gives a customer a new name.
CREATE OR REPLACE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(cqrs._text_problem('name', name, 200),
                             cqrs._id_problem('customer_id', customer_id),
                             CASE WHEN expected_version IS NOT NULL  -- versions start at 1
                                  THEN cqrs._range_problem('expected_version', expected_version, 1) END,
                             cqrs._id_problem('command_id', command_id));
    v_name text := cqrs._trim(name);
    v_version integer;
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'rename_customer',
                                 jsonb_build_object('customer_id', customer_id, 'name', name,
                                                    'expected_version', expected_version));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    -- NO KEY UPDATE: does not block orders whose foreign key check locks this customer.
    SELECT c.version INTO v_version
      FROM shop.customers c
     WHERE c.id = rename_customer.customer_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('customer %s does not exist', customer_id);
    END IF;
    problem := cqrs._version_problem('customer', customer_id, expected_version, v_version);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ004', MESSAGE = problem;
    END IF;

    UPDATE shop.customers c
       SET name = v_name, version = c.version + 1
     WHERE c.id = rename_customer.customer_id
    RETURNING c.version INTO v_version;
    RETURN cqrs._finish_command(command_id, customer_id, v_version);
END
$$;

-- sql/shop/functions/add_product.sql
-- Adds a product to the catalogue under a unique sku.
CREATE OR REPLACE FUNCTION shop.add_product(command_id uuid, sku text, name text, price_cents bigint, initial_stock integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(cqrs._text_problem('sku', sku, 100),
                             cqrs._text_problem('name', name, 200),
                             cqrs._range_problem('price_cents', price_cents, 0),
                             cqrs._range_problem('initial_stock', initial_stock, 0),
                             cqrs._id_problem('command_id', command_id));
    v_sku text := cqrs._trim(sku);
    v_name text := cqrs._trim(name);
    v_id uuid := gen_random_uuid();
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'add_product',
                                 jsonb_build_object('sku', sku, 'name', name, 'price_cents', price_cents,
                                                    'initial_stock', initial_stock));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    INSERT INTO shop.products (id, sku, name, price_cents, stock)
    VALUES (v_id, v_sku, v_name, price_cents, initial_stock)
    ON CONFLICT ON CONSTRAINT products_sku_key DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003', MESSAGE = format('sku %L is already taken', v_sku);
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/restock.sql
-- Adds quantity units to a product's stock.
CREATE OR REPLACE FUNCTION shop.restock(command_id uuid, sku text, quantity integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(cqrs._text_problem('sku', sku, 100),
                             cqrs._range_problem('quantity', quantity, 1),
                             cqrs._id_problem('command_id', command_id));
    v_sku text := cqrs._trim(sku);
    v_id uuid;
    v_stock integer;
    v_version integer;
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'restock',
                                 jsonb_build_object('sku', sku, 'quantity', quantity));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    SELECT p.id, p.stock INTO v_id, v_stock
      FROM shop.products p
     WHERE p.sku = v_sku
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('product with sku %L does not exist', v_sku);
    END IF;
    IF v_stock > 2147483647 - quantity THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003',
            MESSAGE = format('stock of sku %L would exceed 2147483647 (%s + %s)', v_sku, v_stock, quantity);
    END IF;

    UPDATE shop.products p
       SET stock = p.stock + quantity, version = p.version + 1
     WHERE p.id = v_id
    RETURNING p.version INTO v_version;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;

-- sql/shop/functions/change_price.sql
-- Sets the price that future orders of a product capture.
CREATE OR REPLACE FUNCTION shop.change_price(command_id uuid, sku text, price_cents bigint)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(cqrs._text_problem('sku', sku, 100),
                             cqrs._range_problem('price_cents', price_cents, 0),
                             cqrs._id_problem('command_id', command_id));
    v_sku text := cqrs._trim(sku);
    v_id uuid;
    v_version integer;
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'change_price',
                                 jsonb_build_object('sku', sku, 'price_cents', price_cents));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    UPDATE shop.products p
       SET price_cents = change_price.price_cents, version = p.version + 1
     WHERE p.sku = v_sku
    RETURNING p.id, p.version INTO v_id, v_version;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('product with sku %L does not exist', v_sku);
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;

-- sql/shop/functions/place_order.sql
-- Places an order: takes the stock of every line and captures each product's current price.
CREATE OR REPLACE FUNCTION shop.place_order(command_id uuid, customer_id uuid, lines jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parsed record := shop._parse_order_lines(lines);
    problem text := coalesce(cqrs._id_problem('customer_id', customer_id),
                             parsed.problem,
                             cqrs._id_problem('command_id', command_id));
    v_id uuid := gen_random_uuid();
    missing text;
    short record;
    total numeric;
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'place_order',
                                 jsonb_build_object('customer_id', customer_id, 'lines', lines));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM shop.customers c WHERE c.id = place_order.customer_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('customer %s does not exist', customer_id);
    END IF;

    -- Lock the products in id order, as every command does, so two orders never deadlock.
    PERFORM 1 FROM shop.products p WHERE p.sku = ANY (parsed.skus) ORDER BY p.id FOR NO KEY UPDATE;

    SELECT l.sku INTO missing
      FROM unnest(parsed.skus) WITH ORDINALITY AS l(sku, line_no)
     WHERE NOT EXISTS (SELECT 1 FROM shop.products p WHERE p.sku = l.sku)
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('product with sku %L does not exist', missing);
    END IF;

    SELECT p.sku, p.stock, l.quantity INTO short
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     WHERE p.stock < l.quantity
     ORDER BY l.line_no
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003',
            MESSAGE = format('not enough stock of sku %L: %s ordered, %s in stock', short.sku, short.quantity, short.stock);
    END IF;

    -- Read models sum quantity * unit_price_cents in bigint: an order they cannot total
    -- would stop every projection, so it is refused here.
    SELECT sum(l.quantity::numeric * p.price_cents) INTO total
      FROM unnest(parsed.skus, parsed.quantities) AS l(sku, quantity)
      JOIN shop.products p ON p.sku = l.sku;
    IF total > 9223372036854775807 THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003',
            MESSAGE = format('order total of %s cents exceeds the largest allowed, 9223372036854775807', total);
    END IF;

    UPDATE shop.products p
       SET stock = p.stock - l.quantity, version = p.version + 1
      FROM unnest(parsed.skus, parsed.quantities) AS l(sku, quantity)
     WHERE p.sku = l.sku;

    INSERT INTO shop.orders (id, customer_id, status)
    VALUES (v_id, customer_id, 'placed');

    INSERT INTO shop.order_lines (order_id, line_no, product_id, quantity, unit_price_cents)
    SELECT v_id, l.line_no, p.id, l.quantity, p.price_cents
      FROM unnest(parsed.skus, parsed.quantities) WITH ORDINALITY AS l(sku, quantity, line_no)
      JOIN shop.products p ON p.sku = l.sku
     ORDER BY l.line_no;

    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;

-- sql/shop/functions/cancel_order.sql
-- Cancels a placed order and gives its stock back.
CREATE OR REPLACE FUNCTION shop.cancel_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    closed shop.closing := shop._close_order('cancel_order', command_id, order_id, expected_version, 'cancelled');
BEGIN
    IF closed.problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = closed.errcode, MESSAGE = closed.problem;
    END IF;
    RETURN closed.receipt;
END
$$;

-- sql/shop/functions/ship_order.sql
-- Ships a placed order.
CREATE OR REPLACE FUNCTION shop.ship_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    closed shop.closing := shop._close_order('ship_order', command_id, order_id, expected_version, 'shipped');
BEGIN
    IF closed.problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = closed.errcode, MESSAGE = closed.problem;
    END IF;
    RETURN closed.receipt;
END
$$;

-- sql/shop_read/schema.sql
-- The read model: denormalized tables kept by the daemon, and a materialized view it
-- refreshes. Readable by cqrs_reader, typically on a streaming replica.
CREATE SCHEMA shop_read;

-- sql/shop_read/tables/order_summary.sql
-- One row per order with its totals and its customer's current name and email.
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_read.order_summary (
    order_id       uuid PRIMARY KEY,
    customer_id    uuid NOT NULL,
    customer_name  text,
    customer_email text,
    status         text NOT NULL,
    line_count     integer NOT NULL DEFAULT 0,
    item_count     bigint NOT NULL DEFAULT 0,
    total_cents    bigint NOT NULL DEFAULT 0,
    placed_at      timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    version        integer NOT NULL
) WITH (fillfactor = 70);

-- named as PostgreSQL would name it, so that a rebuild's copy (LIKE ... INCLUDING ALL)
-- gets the same name
CREATE INDEX order_summary_customer_id_idx ON shop_read.order_summary (customer_id);

-- sql/shop_read/tables/customer_stats.sql
-- One row per customer: orders placed, cancelled and shipped, and the value of orders
-- not cancelled (numeric: each order's total fits a bigint, as place_order checks, but a
-- customer's sum of them need not, and an overflow would stop the projection).
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_read.customer_stats (
    customer_id          uuid PRIMARY KEY,
    name                 text NOT NULL,
    email                text NOT NULL,
    orders_placed        bigint NOT NULL DEFAULT 0,
    orders_cancelled     bigint NOT NULL DEFAULT 0,
    orders_shipped       bigint NOT NULL DEFAULT 0,
    lifetime_value_cents numeric NOT NULL DEFAULT 0
) WITH (fillfactor = 70);

-- sql/shop_read/views/product_sales.sql
-- One row per product: units sold and revenue over lines of orders not cancelled
-- (revenue numeric: each line's value fits a bigint, the sum over all lines need not).
-- Refreshed CONCURRENTLY by the daemon, which needs the unique index on product_id.
CREATE MATERIALIZED VIEW shop_read.product_sales AS
SELECT p.id AS product_id,
       p.sku,
       p.name,
       p.price_cents,
       p.stock,
       coalesce(sum(l.quantity) FILTER (WHERE o.status <> 'cancelled'), 0)::bigint AS units_sold,
       coalesce(sum(l.quantity * l.unit_price_cents) FILTER (WHERE o.status <> 'cancelled'), 0)::numeric AS revenue_cents
  FROM shop.products p
  LEFT JOIN shop.order_lines l ON l.product_id = p.id
  LEFT JOIN shop.orders o ON o.id = l.order_id
 GROUP BY p.id;

CREATE UNIQUE INDEX product_sales_product_id ON shop_read.product_sales (product_id);

-- sql/shop_proj/schema.sql
-- How the shop's projections turn events into shop_read rows: their apply functions and
-- the private state they keep (latest versions seen), never exposed to readers.
CREATE SCHEMA shop_proj;

-- sql/shop_proj/tables/order_summary_customers.sql
-- order_summary's copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.order_summary_customers (
    customer_id uuid PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    version     integer NOT NULL
);

-- sql/shop_proj/tables/customer_stats_customers.sql
-- customer_stats' copy of each customer's latest name and email, by version.
CREATE TABLE shop_proj.customer_stats_customers (LIKE shop_proj.order_summary_customers INCLUDING ALL);

-- sql/shop_proj/tables/customer_stats_orders.sql
-- customer_stats' view of each order: its latest status (by version) and its total.
-- fillfactor 70: batches update rows in place; room on the page keeps most updates HOT
-- (no new index entry; see sql/cqrs/DESIGN.md).
CREATE TABLE shop_proj.customer_stats_orders (
    order_id    uuid PRIMARY KEY,
    customer_id uuid NOT NULL,
    status      text NOT NULL,
    total_cents bigint NOT NULL DEFAULT 0,
    version     integer NOT NULL
) WITH (fillfactor = 70);

-- named as PostgreSQL would name it (see shop_read/tables/order_summary.sql)
CREATE INDEX customer_stats_orders_customer_id_idx ON shop_proj.customer_stats_orders (customer_id);

-- sql/shop_proj/functions/apply_order_summary.sql
-- Applies one batch of events to order_summary, set-based, in three statements:
-- 1. customers whose name or email is newer in the batch (version-guarded) are upserted
--    into the private copy, and then their orders renamed, by index: the renamed
--    customers pass as arrays, whose size the planner sees (joined to the upsert's
--    RETURNING, a guessed size, the update scanned all of order_summary);
-- 2. per order in the batch, one group holds its latest state and its new lines, so an
--    order's row is written once: upserted with its state (applied only over an older
--    version) plus its lines, or, lines only, updated.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic. plan_cache_mode: the batch bounds
-- are parameters, and a generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_order_summary(from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    renamed uuid[];
    names text[];
    emails text[];
BEGIN
    WITH bc AS MATERIALIZED (
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id AS customer_id, e.payload ->> 'name' AS name, e.payload ->> 'email' AS email,
               e.aggregate_version AS version
          FROM cqrs.batch(from_position, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC),
    cu AS (
        INSERT INTO order_summary_customers AS c (customer_id, name, email, version)
        SELECT bc.customer_id, bc.name, bc.email, bc.version FROM bc
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id, c.name, c.email)
    SELECT array_agg(cu.customer_id), array_agg(cu.name), array_agg(cu.email)
      INTO renamed, names, emails
      FROM cu;

    -- Orders placed before their customer's event was applied get the name here too.
    IF renamed IS NOT NULL THEN
        UPDATE order_summary s
           SET customer_name = cu.name, customer_email = cu.email
          FROM unnest(renamed, names, emails) AS cu(customer_id, name, email)
         WHERE s.customer_id = cu.customer_id
           AND (s.customer_name, s.customer_email) IS DISTINCT FROM (cu.name, cu.email);
    END IF;

    WITH o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg(e.payload ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS state,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               count(*) FILTER (WHERE e.event_type = 'order_line.created') AS line_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS item_count,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM cqrs.batch(from_position, to_position) e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- Lines arrive once each, after their order's row (same transaction, later position).
    os AS (
        INSERT INTO order_summary AS s
               (order_id, customer_id, customer_name, customer_email, status, line_count, item_count, total_cents,
                placed_at, updated_at, version)
        SELECT o.order_id, (o.state ->> 'customer_id')::uuid, c.name, c.email, o.state ->> 'status',
               o.line_count, o.item_count, o.total_cents,
               (o.state ->> 'placed_at')::timestamptz, (o.state ->> 'updated_at')::timestamptz,
               o.version
          FROM o
          LEFT JOIN order_summary_customers c ON c.customer_id = (o.state ->> 'customer_id')::uuid
         WHERE o.state IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               updated_at = CASE WHEN s.version < excluded.version THEN excluded.updated_at ELSE s.updated_at END,
               version = greatest(s.version, excluded.version),
               line_count = s.line_count + excluded.line_count,
               item_count = s.item_count + excluded.item_count,
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.line_count <> 0)
    UPDATE order_summary s
       SET line_count = s.line_count + o.line_count,
           item_count = s.item_count + o.item_count,
           total_cents = s.total_cents + o.total_cents
      FROM o
     WHERE s.order_id = o.order_id
       AND o.state IS NULL;
END
$$;

-- sql/shop_proj/functions/apply_customer_stats.sql
-- Applies one batch of events to customer_stats, by deltas: what a batch changes is added
-- to the counts of the customers it touches, never recomputed from all their orders
-- (which grew with each customer's history: at 1M events it was half of the apply time).
-- 1. One statement reads the batch once and updates the private customer and order state
--    (version-guarded; per order, one group holds its latest state and its new lines, so
--    its row is written once). From the same snapshot it reads each order's state before
--    the batch and returns, per customer, what changed: orders placed, cancelled and
--    shipped, and value of orders not cancelled. It also returns the customers whose name
--    or email it stored, and whether each was new.
-- 2. The deltas are added to the rows of customer_stats that exist: a customer's row is
--    created with their customer.created event. (Readers get events in position order,
--    which puts a customer's creation before any order of theirs; the apply function does
--    not rely on it.)
-- 3. A customer new in this batch is counted in full from the private order state (their
--    orders so far, this batch's included); a renamed one gets the new name and email.
-- No statement joins two batch-derived sets to each other: their row estimates are
-- guesses, and a nested loop between them is quadratic (an order's state before the batch
-- is read by primary key). plan_cache_mode: the batch bounds are parameters, and a
-- generic plan cannot estimate the batch from them.
-- Tables are named without a schema: cqrs.run_projection resolves them through the
-- projection's search_path, or a rebuild's shadow schema (cqrs.rebuild_step).
CREATE OR REPLACE FUNCTION shop_proj.apply_customer_stats(from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    changed uuid[];
    placed bigint[];
    cancelled bigint[];
    shipped bigint[];
    value numeric[];
    named uuid[];
    fresh boolean[];
BEGIN
    WITH e AS MATERIALIZED (
        SELECT e.event_type, e.aggregate_id, e.aggregate_version, e.payload
          FROM cqrs.batch(from_position, to_position) e
         WHERE e.event_type IN ('customer.created', 'customer.updated', 'order.created', 'order.updated',
                                'order_line.created')),
    cu AS (
        INSERT INTO customer_stats_customers AS c (customer_id, name, email, version)
        SELECT DISTINCT ON (e.aggregate_id)
               e.aggregate_id, e.payload ->> 'name', e.payload ->> 'email', e.aggregate_version
          FROM e
         WHERE e.event_type IN ('customer.created', 'customer.updated')
         ORDER BY e.aggregate_id, e.aggregate_version DESC
        ON CONFLICT (customer_id) DO UPDATE
           SET name = excluded.name, email = excluded.email, version = excluded.version
         WHERE c.version < excluded.version
        RETURNING c.customer_id),
    o AS MATERIALIZED (
        SELECT e.aggregate_id AS order_id,
               (array_agg((e.payload ->> 'customer_id')::uuid ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS customer_id,
               (array_agg(e.payload ->> 'status' ORDER BY e.aggregate_version DESC)
                    FILTER (WHERE e.event_type <> 'order_line.created'))[1] AS status,
               max(e.aggregate_version) FILTER (WHERE e.event_type <> 'order_line.created') AS version,
               coalesce(sum((e.payload ->> 'quantity')::bigint * (e.payload ->> 'unit_price_cents')::bigint)
                            FILTER (WHERE e.event_type = 'order_line.created'), 0) AS total_cents
          FROM e
         WHERE e.event_type IN ('order.created', 'order.updated', 'order_line.created')
         GROUP BY e.aggregate_id),
    -- orders with a state event in the batch: new state only over an older version, plus lines
    os AS (
        INSERT INTO customer_stats_orders AS s (order_id, customer_id, status, total_cents, version)
        SELECT o.order_id, o.customer_id, o.status, o.total_cents, o.version
          FROM o
         WHERE o.version IS NOT NULL
        ON CONFLICT (order_id) DO UPDATE
           SET status = CASE WHEN s.version < excluded.version THEN excluded.status ELSE s.status END,
               version = greatest(s.version, excluded.version),
               total_cents = s.total_cents + excluded.total_cents
         WHERE s.version < excluded.version OR excluded.total_cents <> 0),
    -- orders with only lines in the batch
    ol AS (
        UPDATE customer_stats_orders s
           SET total_cents = s.total_cents + o.total_cents
          FROM o
         WHERE s.order_id = o.order_id
           AND o.version IS NULL
           AND o.total_cents <> 0),
    -- each order before and after the batch, as the two statements above write it (this
    -- statement's snapshot does not see their writes)
    b AS (
        SELECT coalesce(o.customer_id, s.customer_id) AS customer_id,
               s.order_id IS NOT NULL AS existed,
               s.status AS old_status,
               s.total_cents AS old_total,
               CASE WHEN o.version IS NOT NULL AND (s.version IS NULL OR s.version < o.version)
                    THEN o.status ELSE s.status END AS status,
               coalesce(s.total_cents, 0) + o.total_cents AS total
          FROM o
          LEFT JOIN customer_stats_orders s ON s.order_id = o.order_id
         WHERE s.order_id IS NOT NULL OR o.version IS NOT NULL),
    d AS (
        SELECT b.customer_id,
               count(*) FILTER (WHERE NOT b.existed) AS placed,
               count(*) FILTER (WHERE b.status = 'cancelled')
                 - count(*) FILTER (WHERE b.old_status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE b.status = 'shipped')
                 - count(*) FILTER (WHERE b.old_status = 'shipped') AS shipped,
               coalesce(sum(b.total) FILTER (WHERE b.status <> 'cancelled'), 0)
                 - coalesce(sum(b.old_total) FILTER (WHERE b.old_status <> 'cancelled'), 0) AS value
          FROM b
         GROUP BY b.customer_id)
    SELECT (SELECT array_agg(d.customer_id) FROM d), (SELECT array_agg(d.placed) FROM d),
           (SELECT array_agg(d.cancelled) FROM d), (SELECT array_agg(d.shipped) FROM d),
           (SELECT array_agg(d.value) FROM d),
           (SELECT array_agg(cu.customer_id) FROM cu),
           -- new: not there before this statement (whose snapshot does not see cu's writes)
           (SELECT array_agg(NOT EXISTS (SELECT 1 FROM customer_stats_customers k WHERE k.customer_id = cu.customer_id))
              FROM cu)
      INTO changed, placed, cancelled, shipped, value, named, fresh;

    IF changed IS NOT NULL THEN
        UPDATE customer_stats s
           SET orders_placed = s.orders_placed + d.placed,
               orders_cancelled = s.orders_cancelled + d.cancelled,
               orders_shipped = s.orders_shipped + d.shipped,
               lifetime_value_cents = s.lifetime_value_cents + d.value
          FROM unnest(changed, placed, cancelled, shipped, value) AS d(customer_id, placed, cancelled, shipped, value)
         WHERE s.customer_id = d.customer_id
           AND (d.placed, d.cancelled, d.shipped, d.value) <> (0, 0, 0, 0);
    END IF;

    IF named IS NULL THEN
        RETURN;
    END IF;
    -- new customers counted in full (the deltas above found no row of theirs); renamed ones
    -- take the new name (their counts are not touched)
    INSERT INTO customer_stats AS s
           (customer_id, name, email, orders_placed, orders_cancelled, orders_shipped, lifetime_value_cents)
    SELECT c.customer_id, c.name, c.email,
           count(o.order_id),
           count(o.order_id) FILTER (WHERE o.status = 'cancelled'),
           count(o.order_id) FILTER (WHERE o.status = 'shipped'),
           coalesce(sum(o.total_cents) FILTER (WHERE o.status <> 'cancelled'), 0)
      FROM unnest(named, fresh) AS n(customer_id, fresh)
      JOIN customer_stats_customers c ON c.customer_id = n.customer_id
      LEFT JOIN customer_stats_orders o ON o.customer_id = c.customer_id AND n.fresh
     GROUP BY c.customer_id
    ON CONFLICT (customer_id) DO UPDATE
       SET name = excluded.name,
           email = excluded.email
     WHERE (s.name, s.email) IS DISTINCT FROM (excluded.name, excluded.email);
END
$$;

-- sql/shop_proj/data/projections.sql
-- The shop's three projections.
SELECT cqrs.register_projection(
    'order_summary', 'sql', 'shop_proj.apply_order_summary',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.order_summary', 'shop_proj.order_summary_customers']::regclass[]);
SELECT cqrs.register_projection(
    'customer_stats', 'sql', 'shop_proj.apply_customer_stats',
    search_path => 'shop_read, shop_proj',
    tables => ARRAY['shop_read.customer_stats', 'shop_proj.customer_stats_customers',
                    'shop_proj.customer_stats_orders']::regclass[]);
SELECT cqrs.register_projection(
    'product_sales', 'matview',
    matview => 'shop_read.product_sales',
    event_types => ARRAY['product.created', 'product.updated',
                         'order.created', 'order.updated', 'order_line.created']);

-- sql/shop/privileges.sql
-- Least privilege for the shop (the cqrs core's own grants are in sql/cqrs/privileges.sql):
-- no function is executable by PUBLIC; each group role gets only what its users need.
-- SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else.
GRANT USAGE ON SCHEMA shop TO cqrs_writer;
GRANT EXECUTE ON FUNCTION
    shop.register_customer(uuid, text, text),
    shop.rename_customer(uuid, uuid, text, integer),
    shop.add_product(uuid, text, text, bigint, integer),
    shop.restock(uuid, text, integer),
    shop.change_price(uuid, text, bigint),
    shop.place_order(uuid, uuid, jsonb),
    shop.cancel_order(uuid, uuid, integer),
    shop.ship_order(uuid, uuid, integer)
TO cqrs_writer;

-- cqrs_reader: the read model.
GRANT USAGE ON SCHEMA shop_read TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;
