-- Compares a projection's read model with its definition computed from the write model, in
-- this transaction's one snapshot (hence REPEATABLE READ or SERIALIZABLE, refused
-- otherwise; roll it back after). One row per relation: outcome 'equal' or 'different'
-- (differing: rows in one and not the other, counted both ways); or one row without a
-- relation: 'halted' (at failed_position), 'behind' (events this snapshot sees are not
-- applied yet: compare again later), 'undeclared' (no state function: nothing to compare
-- with). A sql or python projection's tables are compared with what its state function
-- fills temporary copies of them with; a materialized view with its own query.
CREATE OR REPLACE FUNCTION cqrs.verify(projection text)
RETURNS TABLE (relation text, outcome text, differing bigint)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    t regclass;
    copy_ text;
    copies text[] := '{}'::text[];
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM cqrs._fail('CQ003', 'cqrs.verify compares under one snapshot: call it in a REPEATABLE READ '
                                    'transaction (BEGIN ISOLATION LEVEL REPEATABLE READ) and roll that back');
    END IF;
    p := cqrs._projection(projection);
    IF p.state = 'halted' THEN
        RETURN QUERY SELECT NULL::text, 'halted'::text, NULL::bigint;
        RETURN;
    END IF;
    -- the read model holds the events up to its checkpoint, every one of which this
    -- snapshot sees: it equals the definition only if the snapshot sees no later one
    IF EXISTS (SELECT 1 FROM cqrs.outbox o WHERE o.position > p.last_position) THEN
        RETURN QUERY SELECT NULL::text, 'behind'::text, NULL::bigint;
        RETURN;
    END IF;
    IF p.kind = 'matview' THEN
        relation := p.matview;
        EXECUTE format('SELECT count(*) FROM ((TABLE %1$s EXCEPT ALL %2$s) UNION ALL (%2$s EXCEPT ALL TABLE %1$s)) d',
                       p.matview, '(' || rtrim(btrim(pg_get_viewdef(p.matview::regclass)), ';') || ')')
           INTO differing;
        outcome := CASE WHEN differing = 0 THEN 'equal' ELSE 'different' END;
        RETURN NEXT;
        RETURN;
    ELSIF p.state_function IS NULL THEN
        RETURN QUERY SELECT NULL::text, 'undeclared'::text, NULL::bigint;
        RETURN;
    END IF;
    -- empty temporary copies, named as the tables, filled by the state function
    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        copy_ := format('pg_temp.%I', (SELECT c.relname FROM pg_class c WHERE c.oid = t));
        EXECUTE format('DROP TABLE IF EXISTS %s', copy_);
        EXECUTE format('CREATE TEMPORARY TABLE %s (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)',
                       copy_, t);
        copies := copies || copy_;
    END LOOP;
    PERFORM cqrs._load_state(p.state_function::regproc, 'pg_temp');
    FOR i IN 1 .. cardinality(copies) LOOP
        relation := p.tables[i];
        EXECUTE format('SELECT count(*) FROM ((TABLE %1$s EXCEPT ALL TABLE %2$s) UNION ALL (TABLE %2$s EXCEPT ALL TABLE %1$s)) d',
                       p.tables[i]::regclass, copies[i])
           INTO differing;
        outcome := CASE WHEN differing = 0 THEN 'equal' ELSE 'different' END;
        RETURN NEXT;
        EXECUTE format('DROP TABLE %s', copies[i]);
    END LOOP;
END
$$;
