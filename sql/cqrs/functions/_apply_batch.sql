-- Runs a sql projection's apply function f(from_position, to_position) over one batch, its
-- unqualified table names resolved through search_path: the projection's schemas, or a
-- rebuild's shadow schema.
-- Plans (unless the apply function sets plan_cache_mode itself): a batch over at most
-- 1,000 positions runs on generic plans, made once per session, as for a few events:
-- index lookups and nested loops. Planning a set-based statement for its bounds costs more
-- than applying a few events; a generic plan cannot see the bounds, and guesses a share of
-- the whole outbox for the batch: made freely, its joins hashed whole read models (60 ms
-- a batch at 1M orders, measured) where a handful of index lookups do. Nested loops over
-- at most 1,000 positions stay small while the plan's estimates of the read models hold
-- (the daemon has plans made again as they grow: sql/cqrs/DESIGN.md). A larger batch, a
-- catch-up's, gets plans made for its bounds (cqrs._apply_large_batch), whose estimates
-- its thousands of events need. No JIT: compiling a statement takes tens of milliseconds,
-- longer than a batch's statements run.
-- The small batch, every round's, is applied here without a further call: each layer of
-- PL/pgSQL costs a round a few hundredths of a millisecond.
CREATE OR REPLACE FUNCTION cqrs._apply_batch(apply_function regproc, search_path text, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET jit = off
AS $$
BEGIN
    IF to_position - from_position > 1000 THEN
        PERFORM cqrs._apply_large_batch(apply_function, _apply_batch.search_path, from_position, to_position);
        RETURN;
    END IF;
    -- local to this call: the SET clause above restores the path when it returns
    PERFORM set_config('search_path', 'pg_catalog, ' || _apply_batch.search_path || ', pg_temp', true);
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;  -- schema-qualified
END
$$;
