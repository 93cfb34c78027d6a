-- Registers a customer under a unique (case-insensitive) email address.
CREATE OR REPLACE FUNCTION shop.register_customer(command_id uuid, email text, name text)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_email text := shop._normalize_email(email);
    v_name text := cqrs._require_text('name', name, 200);
    v_id uuid := gen_random_uuid();
    r cqrs.receipt;
BEGIN
    r := cqrs._begin_command(command_id, 'register_customer',
                             jsonb_build_object('email', email, 'name', name));
    IF r.duplicate THEN
        RETURN r;
    END IF;

    INSERT INTO shop.customers (id, email, name)
    VALUES (v_id, v_email, v_name)
    ON CONFLICT ON CONSTRAINT customers_email_key DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format('email %L is already registered', v_email));
    END IF;
    RETURN cqrs._finish_command(command_id, v_id, 1);
END
$$;
