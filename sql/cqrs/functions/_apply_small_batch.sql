-- Runs a sql projection's apply function over a small batch (for cqrs._apply_batch) on
-- generic plans, made once per session, as for a few events: index lookups and nested
-- loops. A generic plan cannot see the bounds, and guesses a share of the whole outbox
-- for the batch: made freely, its joins hashed whole read models (60 ms a batch at 1M
-- orders, measured) where a handful of index lookups do. Nested loops over a batch of at
-- most 1,000 positions stay small while the plan's estimates of the read models hold
-- (the daemon has plans made again as they grow: sql/cqrs/DESIGN.md). The caller's
-- search_path stays: the projection's.
CREATE OR REPLACE FUNCTION cqrs._apply_small_batch(apply_function regproc, from_position bigint, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    EXECUTE format('SELECT %s($1, $2)', apply_function) USING from_position, to_position;
END
$$;
