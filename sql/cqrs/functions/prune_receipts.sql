-- Deletes up to max_rows receipts (cqrs.commands rows) older than older_than, oldest
-- first; returns how many it deleted. A retry of a pruned command_id runs the command
-- again, so keep receipts longer than any client retries. Call it until it returns 0, each
-- call in its own transaction: one huge DELETE would hold an xid, and with it every
-- projection (the xmin fence), for its whole duration.
CREATE OR REPLACE FUNCTION cqrs.prune_receipts(older_than interval, max_rows integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    deleted integer;
BEGIN
    IF older_than IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'older_than must not be null');
    ELSIF older_than < interval '0' THEN
        PERFORM cqrs._fail('CQ001', format('older_than must not be negative, got %s', older_than));
    END IF;
    PERFORM cqrs._require_range('max_rows', max_rows, 1, 1000000);

    DELETE FROM cqrs.commands c
     WHERE c.command_id IN (SELECT o.command_id
                              FROM cqrs.commands o
                             WHERE o.created_at < now() - older_than
                             ORDER BY o.created_at
                             LIMIT max_rows
                               FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
