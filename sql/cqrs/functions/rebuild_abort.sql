-- Abandons a rebuild of projection: its shadow schema and its row go; the live tables are
-- untouched. Refused (CQ003) while another session that began it is still running it
-- (the session itself may: cqrs-pg rebuild abandons its own rebuild when it fails), CQ002
-- when there is none.
CREATE OR REPLACE FUNCTION cqrs.rebuild_abort(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM cqrs.rebuild_status() x WHERE x.projection = rebuild_abort.projection;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    ELSIF r.running AND r.pid <> pg_backend_pid() THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L is running (pid %s): stop it first (it leaves nothing live behind)',
            projection, r.pid));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE',
                   (SELECT x.shadow_schema FROM cqrs.rebuilds x WHERE x.projection = rebuild_abort.projection));
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_abort.projection;
END
$$;
