-- Ships a placed order.
CREATE OR REPLACE FUNCTION shop.ship_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM shop._close_order('ship_order', command_id, order_id, expected_version, 'shipped');
$$;
