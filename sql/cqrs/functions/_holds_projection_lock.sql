-- Whether this session holds the lock of cqrs._lock_projection on the projection: a
-- python projection's batch may be read and completed only by the transaction that
-- claimed it (cqrs.claim_batch).
CREATE FUNCTION cqrs._holds_projection_lock(projection text)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM pg_locks l
         WHERE l.locktype = 'advisory'
           AND l.pid = pg_backend_pid()
           AND l.granted
           AND l.classid = 1668444016::oid
           AND l.objid = hashtext(projection)::oid
           AND l.objsubid = 2);
$$;
