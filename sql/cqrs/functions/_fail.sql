-- Raises a cqrs error: errcode is one of the documented CQ00x SQLSTATEs.
-- VOLATILE on purpose: the planner evaluates an IMMUTABLE call with constant arguments
-- while planning, which would raise the error even in a CASE branch that never runs.
CREATE OR REPLACE FUNCTION cqrs._fail(errcode text, message text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- @plpgsql_check_options: performance_warnings = false
    RAISE EXCEPTION USING ERRCODE = _fail.errcode, MESSAGE = _fail.message;
END
$$;
