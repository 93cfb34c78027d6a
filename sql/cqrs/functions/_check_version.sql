-- CQ004 when the caller named an expected_version and the row has another.
CREATE FUNCTION cqrs._check_version(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF expected_version IS NOT NULL AND expected_version <> actual_version THEN
        PERFORM cqrs._fail('CQ004', format('%s %s is at version %s, expected version %s',
                                           entity, id, actual_version, expected_version));
    END IF;
END
$$;
