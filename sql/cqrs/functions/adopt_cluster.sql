-- After a logical dump and restore (pg_dump / pg_restore) into another cluster, the
-- transaction ids the engine stored — horizons, marks, receipts' tokens — are the old
-- cluster's. Where they are ahead of this cluster's (at or above its next xid), they would
-- say transactions not yet applied were (cqrs.caught_up) and hold marks that never become
-- usable. This rebases them: horizons back to the start (each recomputed at the next batch
-- or poll), those marks dropped (subscriptions' too), the old daemons' rows forgotten, old receipts' tokens to
-- one every horizon passes. Positions are untouched: reading goes on exactly where each
-- projection's checkpoint is, so no event is skipped or applied twice. Returns the rows
-- it changed (0: the ids had not moved). The daemon calls it as it connects; an operator
-- may call it at once after a restore.
CREATE OR REPLACE FUNCTION cqrs.adopt_cluster()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_xid xid8 := pg_snapshot_xmax(pg_current_snapshot());
    changed bigint := 0::bigint;
    n bigint;
BEGIN
    IF NOT cqrs._xids_moved() THEN
        RETURN 0::bigint;
    END IF;
    -- one adopter at a time; what a concurrent daemon changes meanwhile is rebased after it
    LOCK TABLE cqrs.projections IN SHARE ROW EXCLUSIVE MODE;
    UPDATE cqrs.projections c
       SET horizon = '3', horizon_position = 0,
           mark_xmax = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_xmax END,
           mark_position = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_position END,
           updated_at = now()
     WHERE c.horizon >= next_xid OR c.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.rebuilds r SET mark_xmax = NULL, mark_position = NULL WHERE r.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    DELETE FROM cqrs.listeners l WHERE l.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.subscriptions s SET mark_xmax = NULL, mark_position = NULL WHERE s.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.commands m SET token = 3 WHERE m.token >= next_xid::text::bigint;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN changed + n;
END
$$;
