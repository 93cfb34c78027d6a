-- CQ001 unless min_value <= value (<= max_value when given); returns value.
CREATE OR REPLACE FUNCTION cqrs._require_range(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._range_problem(argument, value, min_value, max_value);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    RETURN value;
END
$$;
