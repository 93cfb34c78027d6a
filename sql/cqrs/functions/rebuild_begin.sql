-- Starts a rebuild of a sql or python projection: empty copies of its tables in a shadow
-- schema, which its apply function (cqrs.rebuild_step) or its handler (cqrs.claim_batch,
-- cqrs.batch_events, cqrs.complete_batch with rebuild) fills from the whole event log, or
-- from where its state function's load (cqrs.rebuild_load) leaves off, while the daemon
-- keeps the live tables current and readers keep reading them. Refused (CQ003) from the
-- log once history was pruned. Refused
-- (CQ003) while another rebuild of it is in progress or was interrupted (abandon that one
-- with cqrs.rebuild_abort), and when something the swap cannot carry depends on one of its
-- tables (cqrs._rebuild_problem).
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
    running record;
    problem text;
    pruned_before bigint := cqrs._history_start();
BEGIN
    p := cqrs._projection(projection);
    IF p.kind NOT IN ('sql', 'python') THEN
        PERFORM cqrs._fail('CQ001', format('projection %L is a %s: it is rebuilt by a refresh, not from the log',
                                           projection, p.kind));
    END IF;
    IF p.state_function IS NULL AND pruned_before IS NOT NULL THEN
        PERFORM cqrs._fail('CQ003', format(
            'the outbox''s history before position %s was pruned: projection %L can be rebuilt only from the '
            'write model''s state; declare its state function (cqrs.set_state_function)',
            pruned_before, projection));
    END IF;
    IF coalesce(cardinality(p.tables), 0) = 0 THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L names no tables (cqrs.projections.tables): there is nothing to rebuild', projection));
    END IF;
    SELECT * INTO running FROM cqrs.rebuild_status() x WHERE x.projection = rebuild_begin.projection;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ003', CASE WHEN running.running
            THEN format('a rebuild of projection %L is in progress (pid %s, since %s): wait for it to finish',
                        projection, running.pid, running.started_at)
            ELSE format('a rebuild of projection %L begun at %s was interrupted: abandon it first '
                        '(cqrs-pg rebuild --abort %s), then rebuild again', projection, running.started_at, projection)
            END);
    END IF;
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        problem := cqrs._rebuild_problem(projection, t, p.tables::regclass[]);
        IF problem IS NOT NULL THEN
            PERFORM cqrs._fail('CQ003', problem);
        END IF;
    END LOOP;
    -- one shadow schema holds a copy of each table
    SELECT c.relname INTO dup
      FROM unnest(p.tables::regclass[]) t_ JOIN pg_class c ON c.oid = t_
     GROUP BY c.relname HAVING count(*) > 1 LIMIT 1;
    IF FOUND THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L owns two tables named %I: a rebuild copies them into one shadow schema', projection, dup));
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', shadow);
    EXECUTE format('CREATE SCHEMA %I', shadow);
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        -- LIKE copies columns, constraints and indexes, not storage parameters (fillfactor)
        EXECUTE format('CREATE TABLE %I.%I (LIKE %s INCLUDING ALL)%s',
                       shadow, (SELECT c.relname FROM pg_class c WHERE c.oid = t), t,
                       (SELECT coalesce(' WITH (' || array_to_string(c.reloptions, ', ') || ')', '')
                          FROM pg_class c WHERE c.oid = t));
    END LOOP;
    INSERT INTO cqrs.rebuilds (projection, shadow_schema, pid, backend_start)
    SELECT projection, shadow, pg_backend_pid(), a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();
END
$$;
