-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format('SELECT %s($1, $2)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_position, to_position;
END
$$;
