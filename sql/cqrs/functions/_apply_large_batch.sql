-- Runs a sql projection's apply function over a batch of more than 1,000 positions (for
-- cqrs._apply_batch) on plans made for its bounds, the planner free to hash, merge and
-- scan, as a catch-up's thousands of events need. No JIT, as for every batch.
CREATE OR REPLACE FUNCTION cqrs._apply_large_batch(apply_function regproc, search_path text, from_position bigint,
                                                   to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = on
SET enable_hashjoin = on
SET enable_mergejoin = on
SET jit = off
AS $$
BEGIN
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_large_batch.search_path || ', pg_temp', true);
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;  -- schema-qualified
END
$$;
