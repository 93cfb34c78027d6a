-- CQ004 when the caller named an expected_version and the row has another.
CREATE OR REPLACE FUNCTION cqrs._check_version(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS void
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._version_problem(entity, id, expected_version, actual_version);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ004', MESSAGE = problem;
    END IF;
END
$$;
