-- Takes this transaction's lock on `name` in `space`, released at commit: waiting for it,
-- or (wait false) only if it is free. Returns whether it holds the lock.
--   projection  one runner at a time applies a projection (a daemon's batch, a swap): a
--               row lock on its row of cqrs.projections
--   rebuild     one transaction at a time fills a projection's rebuild: a row lock on its
--               row of cqrs.rebuilds
--   command     a command_id's twin waits for the first (cqrs._begin_command): an
--               advisory lock (cqrs._lock_space)
-- Row locks, because only a role that may UPDATE those tables (the engine's owner) can
-- take them: an advisory lock is open to every login, which could hold a projection's
-- and stop it. FOR NO KEY UPDATE leaves foreign keys to the row (cqrs.parked) free.
CREATE OR REPLACE FUNCTION cqrs._lock(space text, name text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF space = 'projection' THEN
        IF wait THEN
            PERFORM 1 FROM cqrs.projections c WHERE c.name = _lock.name FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM cqrs.projections c WHERE c.name = _lock.name FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        RETURN FOUND;
    ELSIF space = 'rebuild' THEN
        IF wait THEN
            PERFORM 1 FROM cqrs.rebuilds r WHERE r.projection = _lock.name FOR NO KEY UPDATE;
        ELSE
            PERFORM 1 FROM cqrs.rebuilds r WHERE r.projection = _lock.name FOR NO KEY UPDATE SKIP LOCKED;
        END IF;
        RETURN FOUND;
    ELSIF wait THEN
        PERFORM pg_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
END
$$;
