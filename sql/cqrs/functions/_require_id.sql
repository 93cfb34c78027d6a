-- CQ001 when an id argument is null; returns it.
CREATE FUNCTION cqrs._require_id(argument text, value uuid)
RETURNS uuid
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    END IF;
    RETURN value;
END
$$;
