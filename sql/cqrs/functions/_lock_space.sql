-- The key spaces of the engine's advisory locks, named once: the first key of
-- pg_advisory_xact_lock(key1, key2); the second is the hash of what is locked.
--   command     a command_id's twin waits for the first (cqrs._begin_command)
-- (Projections and rebuilds are locked by row, cqrs._lock: an advisory key is open to
-- every login.)
-- No SET clause, so the planner inlines it and folds the constant.
CREATE OR REPLACE FUNCTION cqrs._lock_space(space text)
RETURNS integer
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT CASE space WHEN 'command' THEN 1668444017 END;
$$;
