-- Adds quantity units to a product's stock.
CREATE OR REPLACE FUNCTION shop.restock(command_id uuid, sku text, quantity integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_id uuid;
    v_stock integer;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('quantity', quantity, 1);
    r := cqrs._begin_command(command_id, 'restock',
                             jsonb_build_object('sku', sku, 'quantity', quantity));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    SELECT p.id, p.stock INTO v_id, v_stock
      FROM shop.products p
     WHERE p.sku = v_sku
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', v_sku));
    END IF;
    IF v_stock > 2147483647 - quantity THEN
        PERFORM cqrs._fail('CQ003', format('stock of sku %L would exceed 2147483647 (%s + %s)',
                                           v_sku, v_stock, quantity));
    END IF;

    UPDATE shop.products p
       SET stock = p.stock + quantity, version = p.version + 1
     WHERE p.id = v_id
    RETURNING p.version INTO v_version;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;
