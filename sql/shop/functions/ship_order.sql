-- Ships a placed order.
CREATE OR REPLACE FUNCTION shop.ship_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    closed shop.closing := shop._close_order('ship_order', command_id, order_id, expected_version, 'shipped');
BEGIN
    IF closed.problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = closed.errcode, MESSAGE = closed.problem;
    END IF;
    RETURN closed.receipt;
END
$$;
