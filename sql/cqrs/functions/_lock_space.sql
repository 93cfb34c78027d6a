-- The key spaces of the engine's advisory locks, named once: the first key of
-- pg_advisory_xact_lock(key1, key2); the second is the hash of what is locked.
--   projection  one runner at a time applies a projection (a daemon's batch, a swap)
--   rebuild     one transaction at a time fills a projection's rebuild
--   command     a command_id's twin waits for the first (cqrs._begin_command)
-- No SET clause, so the planner inlines it and folds the constant.
CREATE OR REPLACE FUNCTION cqrs._lock_space(space text)
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE space WHEN 'projection' THEN 1668444016 WHEN 'command' THEN 1668444017 WHEN 'rebuild' THEN 1668444018 END;
$$;
