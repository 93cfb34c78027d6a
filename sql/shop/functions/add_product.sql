-- Adds a product to the catalogue under a unique sku.
CREATE OR REPLACE FUNCTION shop.add_product(command_id uuid, sku text, name text, price_cents bigint, initial_stock integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_name text := cqrs._require_text('name', name, 200);
    v_id uuid := gen_random_uuid();
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('price_cents', price_cents, 0);
    PERFORM cqrs._require_range('initial_stock', initial_stock, 0);
    r := cqrs._begin_command(command_id, 'add_product',
                             jsonb_build_object('sku', sku, 'name', name, 'price_cents', price_cents,
                                                'initial_stock', initial_stock));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    INSERT INTO shop.products (id, sku, name, price_cents, stock)
    VALUES (v_id, v_sku, v_name, price_cents, initial_stock)
    ON CONFLICT ON CONSTRAINT products_sku_key DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format('sku %L is already taken', v_sku));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;
