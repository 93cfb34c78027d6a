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
