-- Takes this transaction's advisory lock on `name` in key space `space` (cqrs._lock_space),
-- released at commit: waiting for it, or (wait false) only if it is free. Returns whether
-- it holds the lock.
CREATE OR REPLACE FUNCTION cqrs._lock(space text, name text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(cqrs._lock_space(space), hashtext(name));
END
$$;
