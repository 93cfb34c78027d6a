-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
-- Plans (unless the apply function sets plan_cache_mode itself): a batch over at most
-- 1,000 positions runs on generic plans, made once per session as for a small batch
-- (cqrs._apply_small_batch): planning a set-based statement for its bounds costs more
-- than applying a few events. A larger one gets plans made for its bounds, whose
-- estimates a catch-up's thousands of events need. No JIT: compiling a statement takes
-- tens of milliseconds, longer than a batch's statements run.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $$
DECLARE
    call text := format('SELECT %s($1, $2)', apply_function);  -- schema-qualified
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    IF to_position - from_position <= 1000 THEN
        PERFORM cqrs._apply_small_batch(apply_function, from_position, to_position);
    ELSE
        EXECUTE call USING from_position, to_position;
    END IF;
END
$$;
