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
