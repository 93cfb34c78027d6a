-- Gives a customer a new name.
CREATE OR REPLACE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text := cqrs._require_text('name', name, 200);
    v_version integer;
    r cqrs.receipt;
BEGIN
    PERFORM cqrs._require_id('customer_id', customer_id);
    IF expected_version IS NOT NULL THEN  -- versions start at 1
        PERFORM cqrs._require_range('expected_version', expected_version, 1);
    END IF;
    r := cqrs._begin_command(command_id, 'rename_customer',
                             jsonb_build_object('customer_id', customer_id, 'name', name,
                                                'expected_version', expected_version));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    -- NO KEY UPDATE: does not block orders whose foreign key check locks this customer.
    SELECT c.version INTO v_version
      FROM shop.customers c
     WHERE c.id = rename_customer.customer_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('customer %s does not exist', customer_id));
    END IF;
    PERFORM cqrs._check_version('customer', customer_id, expected_version, v_version);

    UPDATE shop.customers c
       SET name = v_name, version = c.version + 1
     WHERE c.id = rename_customer.customer_id
    RETURNING c.version INTO v_version;
    RETURN cqrs._finish_command(command_id, customer_id, v_version);
END
$$;
