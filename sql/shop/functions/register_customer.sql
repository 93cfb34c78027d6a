-- Registers a customer under a unique (case-insensitive) email address.
CREATE OR REPLACE FUNCTION shop.register_customer(command_id uuid, email text, name text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := coalesce(shop._email_problem(email),
                             cqrs._text_problem('name', name, 200),
                             cqrs._id_problem('command_id', command_id));
    v_email text := shop._normalize_email(email);
    v_name text := cqrs._trim(name);
    v_id uuid := gen_random_uuid();
    claim cqrs.claim;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    claim := cqrs._claim_command(command_id, 'register_customer',
                                 jsonb_build_object('email', email, 'name', name));
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    ELSIF (claim.receipt).duplicate THEN
        RETURN claim.receipt;
    END IF;

    INSERT INTO shop.customers (id, email, name)
    VALUES (v_id, v_email, v_name)
    ON CONFLICT ON CONSTRAINT customers_email_key DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003', MESSAGE = format('email %L is already registered', v_email);
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;
