-- Why state_function cannot be a projection's state function (NULL: it can): it must take
-- no arguments and return void.
CREATE OR REPLACE FUNCTION cqrs._state_function_problem(state_function regproc)
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('state function %s must take no arguments and return void', state_function)
     WHERE NOT EXISTS (SELECT 1 FROM pg_proc f
                        WHERE f.oid = state_function AND f.pronargs = 0 AND f.prorettype = 'void'::regtype);
$$;
