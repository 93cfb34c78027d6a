-- Starts (or starts over) a rebuild of a sql projection: empty copies of its tables in a
-- shadow schema, which cqrs.rebuild_step fills from the whole event log while the daemon
-- keeps the live tables current and readers keep reading them.
CREATE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := 'cqrs_rebuild_' || projection;
    t regclass;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind = 'python' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a python projection: rebuilding one is not supported yet',
                                           projection));
    ELSIF p.kind <> 'sql' THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables LOOP
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t);
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
END
$$;
