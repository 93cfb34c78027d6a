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
