-- Runs a sql projection's apply function over one batch, its unqualified table names
-- resolved through search_path: the projection's schemas, or a rebuild's shadow schema.
-- An apply function takes (from_position, to_position); one written for the earlier
-- protocol (from_tx, from_position, to_tx, to_position) is given NULL transaction ids,
-- which its cqrs.batch call does not need.
CREATE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    call text := format(
        CASE (SELECT f.pronargs FROM pg_proc f WHERE f.oid = apply_function)
            WHEN 4 THEN 'SELECT %s(NULL::xid8, $1, NULL::xid8, $2)'
            ELSE 'SELECT %s($1, $2)' END,
        apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE call USING from_position, to_position;
END
$$;
