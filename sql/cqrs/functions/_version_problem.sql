-- The CQ004 message when the caller named an expected_version and the row has another,
-- else NULL. No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._version_problem(entity text, id uuid, expected_version integer, actual_version integer)
RETURNS text
LANGUAGE sql
STABLE
AS $$
    SELECT CASE WHEN expected_version OPERATOR(pg_catalog.<>) actual_version
                THEN pg_catalog.format('%s %s is at version %s, expected version %s',
                                       entity, id, actual_version, expected_version)
           END;
$$;
