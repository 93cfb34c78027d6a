-- Runs a projection's state function, its unqualified table names resolved through
-- search_path (a rebuild's shadow schema, or cqrs.verify's temporary tables), as
-- cqrs._apply_batch runs an apply function.
CREATE OR REPLACE FUNCTION cqrs._load_state(state_function regproc, search_path text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s()', state_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _load_state.search_path || ', pg_temp', true);
    EXECUTE call;
END
$$;
