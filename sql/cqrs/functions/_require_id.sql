-- CQ001 when an id argument is null; returns it.
CREATE OR REPLACE FUNCTION cqrs._require_id(argument text, value uuid)
RETURNS uuid
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem(argument, value);
    END IF;
    RETURN value;
END
$$;
