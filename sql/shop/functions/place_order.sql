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
