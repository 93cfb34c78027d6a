-- Sets the price that future orders of a product capture.
CREATE OR REPLACE FUNCTION shop.change_price(command_id uuid, sku text, price_cents bigint)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sku text := cqrs._require_text('sku', sku, 100);
    v_id uuid;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_range('price_cents', price_cents, 0);
    r := cqrs._begin_command(command_id, 'change_price',
                             jsonb_build_object('sku', sku, 'price_cents', price_cents));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    UPDATE shop.products p
       SET price_cents = change_price.price_cents, version = p.version + 1
     WHERE p.sku = v_sku
    RETURNING p.id, p.version INTO v_id, v_version;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('product with sku %L does not exist', v_sku));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, v_version);
END
$$;
