-- Whether the engine holds transaction ids of another cluster's, ahead of this one's (a
-- logical restore: cqrs.adopt_cluster). A healthy cluster's stored ids are all below its
-- next xid. Reads the small tables only (as the owner: status runs it as the listener).
CREATE OR REPLACE FUNCTION cqrs._xids_moved()
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.projections c
                    WHERE c.horizon >= pg_snapshot_xmax(pg_current_snapshot())
                       OR c.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.rebuilds r WHERE r.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.subscriptions s WHERE s.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()));
$$;
