-- Declares how a sql or python projection's read model is computed from the write model:
-- state_function() fills the projection's tables, found through its search_path, with
-- what its events add up to from the write model's current state (NULL: no longer
-- declared). `cqrs-pg rebuild` then loads the read model from it, resuming the event log
-- exactly where its snapshot leaves off, and `cqrs-pg verify` compares the read model with
-- it. A materialized view needs none: its query is its definition.
CREATE OR REPLACE FUNCTION cqrs.set_state_function(projection text, state_function regproc)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections := cqrs._projection(projection);
    problem text := cqrs._state_function_problem(state_function);
BEGIN
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L is a %s: its query is its definition, it takes no state function', projection, p.kind));
    END IF;
    IF state_function IS NOT NULL AND problem IS NOT NULL THEN
        PERFORM cqrs._fail('CQ001', problem);
    END IF;
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    UPDATE cqrs.projections c SET state_function = set_state_function.state_function::text, updated_at = now()
     WHERE c.name = projection;
END
$$;
