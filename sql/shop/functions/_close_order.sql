-- Moves a placed order to its final status (cancelled gives the stock back). Shared by
-- cancel_order and ship_order, which differ only in the status they set.
CREATE OR REPLACE FUNCTION shop._close_order(command text, command_id uuid, order_id uuid, expected_version integer, new_status text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('order_id', order_id);
    IF expected_version IS NOT NULL THEN  -- versions start at 1
        PERFORM cqrs._require_range('expected_version', expected_version, 1);
    END IF;
    r := cqrs._begin_command(command_id, command,
                             jsonb_build_object('order_id', order_id, 'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    SELECT o.status, o.version INTO v_status, v_version
      FROM shop.orders o
     WHERE o.id = _close_order.order_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('order %s does not exist', order_id));
    END IF;
    PERFORM cqrs._check_version('order', order_id, expected_version, v_version);
    IF v_status <> 'placed' THEN
        PERFORM cqrs._fail('CQ003', format('order %s is %s: only a placed order can be %s',
                                           order_id, v_status, new_status));
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
    RETURN cqrs._finish_command(command_id, order_id, v_version);
END
$$;
