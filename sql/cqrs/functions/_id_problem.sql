-- 'argument must not be null' (a CQ001 message) when an id argument is null, else NULL.
-- No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._id_problem(argument text, value uuid)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE WHEN value IS NULL THEN pg_catalog.format('%s must not be null', argument) END;
$$;
