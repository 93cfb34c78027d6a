-- Cancels a placed order and gives its stock back.
CREATE OR REPLACE FUNCTION shop.cancel_order(command_id uuid, order_id uuid, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    closed shop.closing := shop._close_order('cancel_order', command_id, order_id, expected_version, 'cancelled');
BEGIN
    IF closed.problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = closed.errcode, MESSAGE = closed.problem;
    END IF;
    RETURN closed.receipt;
END
$$;
