-- Whether this transaction holds the lock of cqrs._lock on `name` in `space` (projection
-- or rebuild): a batch may be read and completed only by the transaction that claimed it
-- (cqrs.claim_batch). It does when the row version it sees was locked (xmax) or written
-- (xmin) by this transaction or one of its subtransactions (a savepoint's): an xid whose
-- lock this backend holds until the transaction ends.
CREATE OR REPLACE FUNCTION cqrs._holds_lock(space text, name text)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1
          FROM (SELECT c.xmin, c.xmax FROM cqrs.projections c
                 WHERE space = 'projection' AND c.name = _holds_lock.name
                 UNION ALL
                SELECT r.xmin, r.xmax FROM cqrs.rebuilds r
                 WHERE space = 'rebuild' AND r.projection = _holds_lock.name) x
          JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid IN (x.xmin, x.xmax)
         WHERE l.pid = pg_backend_pid() AND l.granted AND l.mode = 'ExclusiveLock');
$$;
