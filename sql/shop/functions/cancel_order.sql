-- Cancels a placed order and gives its stock back.
CREATE OR REPLACE FUNCTION shop.cancel_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM shop._close_order('cancel_order', command_id, order_id, expected_version, 'cancelled');
$$;
