-- Gives a customer a new name.
CREATE OR REPLACE FUNCTION shop.rename_customer(command_id uuid, customer_id uuid, name text, expected_version integer DEFAULT NULL)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(cqrs._text_problem('name', name, 200),
                             cqrs._id_problem('customer_id', customer_id),
                             CASE WHEN expected_version IS NOT NULL  -- versions start at 1
                                  THEN cqrs._range_problem('expected_version', expected_version, 1) END,
                             cqrs._id_problem('command_id', command_id));
    v_name text := cqrs._trim(name);
    v_version integer;
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'rename_customer',
                                 jsonb_build_object('customer_id', customer_id, 'name', name,
                                                    'expected_version', expected_version));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    -- NO KEY UPDATE: does not block orders whose foreign key check locks this customer.
    SELECT c.version INTO v_version
      FROM shop.customers c
     WHERE c.id = rename_customer.customer_id
       FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ002', MESSAGE = format('customer %s does not exist', customer_id);
    END IF;
    problem := cqrs._version_problem('customer', customer_id, expected_version, v_version);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ004', MESSAGE = problem;
    END IF;

    UPDATE shop.customers c
       SET name = v_name, version = c.version + 1
     WHERE c.id = rename_customer.customer_id
    RETURNING c.version INTO v_version;
    RETURN cqrs._finish_command(command_id, customer_id, v_version);
END
$$;
