-- The lock that lets one runner at a time apply a projection (cqrs.run_projection, and
-- cqrs.rebuild_finish while it swaps tables). An advisory lock, released at commit.
CREATE FUNCTION cqrs._lock_projection(projection text, wait boolean)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock(1668444016, hashtext(projection));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(1668444016, hashtext(projection));
END
$$;
