-- Whether this session holds the lock of cqrs._lock on `name` in key space `space`: a
-- batch may be read and completed only by the transaction that claimed it
-- (cqrs.claim_batch).
CREATE OR REPLACE FUNCTION cqrs._holds_lock(space text, name text)
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
           AND l.classid = cqrs._lock_space(space)::oid
           AND l.objid = hashtext(name)::oid
           AND l.objsubid = 2);
$$;
