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
