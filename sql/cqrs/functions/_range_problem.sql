-- What is wrong with a number argument, as a CQ001 message; NULL when
-- min_value <= value (<= max_value when given). No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._range_problem(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE
        WHEN value IS NULL THEN pg_catalog.format('%s must not be null', argument)
        WHEN value OPERATOR(pg_catalog.<) min_value
            THEN pg_catalog.format('%s must be at least %s, got %s', argument, min_value, value)
        WHEN value OPERATOR(pg_catalog.>) max_value
            THEN pg_catalog.format('%s must be at most %s, got %s', argument, max_value, value)
    END;
$$;
