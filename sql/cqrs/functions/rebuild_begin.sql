-- Starts (or starts over) a rebuild of a sql or python projection: empty copies of its
-- tables in a shadow schema, which its apply function (cqrs.rebuild_step) or its handler
-- (cqrs.claim_batch, cqrs.batch_events, cqrs.complete_batch with rebuild) fills from the whole
-- event log while the daemon keeps the live tables current and readers keep reading them.
CREATE OR REPLACE FUNCTION cqrs.rebuild_begin(projection text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    shadow name := ('cqrs_rebuild_' || projection)::name;
    t regclass;
    dup name;
BEGIN
    p := cqrs._projection(projection);
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    IF coalesce(cardinality(p.tables), 0) = 0 THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L names no tables (cqrs.projections.tables): there is nothing to rebuild', projection));
    END IF;
    -- one shadow schema holds a copy of each table
    SELECT c.relname INTO dup
      FROM unnest(p.tables) t_ JOIN pg_class c ON c.oid = t_
     GROUP BY c.relname HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L owns two tables named %I: a rebuild copies them into one shadow schema', projection, dup));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables LOOP
        -- LIKE copies columns, constraints and indexes, not storage parameters (fillfactor)
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)%s',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t,
                       (SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')
                          FROM pg_class c WHERE c.oid = t));
    END LOOP;
    DELETE FROM cqrs.rebuilds r WHERE r.projection = rebuild_begin.projection;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema) VALUES (projection, shadow);
END
$$;
