-- Finishes a rebuild in one transaction: with the projection's lock held (no daemon
-- applies it meanwhile), catches the shadow up with every event up to the final position
-- (a sql projection, in batches of max_events; a python one's handler has done so earlier
-- in this transaction: cqrs.claim_batch with rebuild and final), then replaces each live table by
-- its shadow copy, grants included. Readers see the old tables until commit and the new
-- ones after: never an empty, half-built or older read model. What deployers added to a
-- table — comment, row-level security and policies, triggers, publications, replica
-- identity, sequences — goes over to its new table (cqrs._table_extras); what cannot
-- (cqrs._rebuild_problem) refuses the swap. Returns the number of events the new tables
-- were built from.
CREATE OR REPLACE FUNCTION cqrs.rebuild_finish(projection text, max_events integer DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
    b record;
    t regclass;
    fresh regclass;
    tbl record;
    grant_ record;
    old_indexes text[];
    swapped regclass[] := '{}'::regclass[];
    shadow_t regclass;
    problem text;
    extras text[];
    statement text;
    seq record;
    identities text[];
    last_values bigint[];
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1);
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    PERFORM cqrs._lock('rebuild', projection, true);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    -- A daemon's batch that read its limit after this one and committed while this waited
    -- for the locks has moved the live checkpoint past it: read the limit again, now at
    -- least that batch's end, and catch the shadow up that far.
    IF p.last_position > lim.final_position THEN
        SELECT * INTO lim FROM cqrs._read_limit();
    END IF;
    LOOP
        EXIT WHEN p.kind <> 'sql';
        PERFORM cqrs._rebuild_reads(r);
        SELECT * INTO b FROM cqrs._next_batch(r.last_position, lim.final_position, max_events);
        EXIT WHEN b.n = 0;
        PERFORM cqrs._apply_batch(p.apply_function::regproc, quote_ident(r.shadow_schema), r.last_position, b.end_position);
        r.last_position := b.end_position;
        r.applied_events := r.applied_events + b.n;
    END LOOP;
    -- Loaded from state: the live projection goes on from the checkpoint without leaving
    -- out what the state holds, so the checkpoint must be past all of that first.
    IF r.snapshot IS NOT NULL AND r.last_position < r.snapshot_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to position %s; events up to %s may still come '
            'from transactions open when its state was loaded: apply them first (cqrs.rebuild_step)',
            projection, r.last_position, r.snapshot_position));
    END IF;
    -- Swapped in, the shadow must hold every event the live tables hold, and perhaps more.
    IF r.last_position < p.last_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has applied the log up to position %s, the live tables up to %s: '
            'catch it up in this transaction first (cqrs.claim_batch with rebuild and final)',
            projection, r.last_position, p.last_position));
    END IF;

    FOREACH t IN ARRAY p.tables::regclass[] LOOP
        -- what depends on the old table, checked again: it may have come during the rebuild
        problem := cqrs._rebuild_problem(projection, t, p.tables::regclass[]);
        IF problem IS NOT NULL THEN
            PERFORM cqrs._fail('CQ003', problem);
        END IF;
        SELECT c.relname, n.nspname, c.relacl, c.relowner INTO tbl
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.oid = t;
        shadow_t := format('%I.%I', r.shadow_schema, tbl.relname)::regclass;
        old_indexes := ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                              WHERE x.indrelid = t ORDER BY 1);
        extras := cqrs._table_extras(t);
        -- A serial column's sequence goes over to the new table (its copy shares it); an
        -- identity column's new sequence goes on from the old one's last value.
        identities := '{}';
        last_values := '{}';
        FOR seq IN SELECT a.attname, a.attidentity, pg_get_serial_sequence(t::text, a.attname) AS name
                     FROM pg_attribute a
                    WHERE a.attrelid = t AND a.attnum > 0 AND NOT a.attisdropped
                      AND pg_get_serial_sequence(t::text, a.attname) IS NOT NULL LOOP
            IF seq.attidentity <> '' THEN
                identities := identities || seq.attname::text;
                last_values := last_values || pg_sequence_last_value(seq.name::regclass);
            ELSE
                EXECUTE format('ALTER SEQUENCE %s OWNED BY %s.%I', seq.name, shadow_t, seq.attname);
            END IF;
        END LOOP;
        EXECUTE format('DROP TABLE %s', t);
        EXECUTE format('ALTER TABLE %s SET SCHEMA %I', shadow_t, tbl.nspname);
        fresh := format('%I.%I', tbl.nspname, tbl.relname)::regclass;
        -- statements cqrs._table_extras built from the catalogs, every name and literal
        -- quoted by format(): no caller's text
        FOREACH statement IN ARRAY extras LOOP
            EXECUTE statement;
        END LOOP;
        FOR i IN 1 .. coalesce(cardinality(identities), 0) LOOP
            IF last_values[i] IS NOT NULL THEN
                PERFORM setval(pg_get_serial_sequence(fresh::text, identities[i]),
                               greatest(last_values[i],
                                        coalesce(pg_sequence_last_value(pg_get_serial_sequence(fresh::text, identities[i])::regclass), 0)));
            END IF;
        END LOOP;
        FOR grant_ IN SELECT * FROM aclexplode(tbl.relacl) a WHERE a.grantee <> tbl.relowner LOOP
            -- the privilege as a keyword from a fixed list, never text from elsewhere
            EXECUTE format('GRANT %s ON %s TO %s',
                           CASE grant_.privilege_type
                               WHEN 'SELECT' THEN 'SELECT' WHEN 'INSERT' THEN 'INSERT'
                               WHEN 'UPDATE' THEN 'UPDATE' WHEN 'DELETE' THEN 'DELETE'
                               WHEN 'TRUNCATE' THEN 'TRUNCATE' WHEN 'REFERENCES' THEN 'REFERENCES'
                               WHEN 'TRIGGER' THEN 'TRIGGER' END,
                           fresh,
                           CASE WHEN grant_.grantee = 0 THEN 'PUBLIC'
                                ELSE quote_ident(pg_get_userbyid(grant_.grantee)) END);
        END LOOP;
        IF old_indexes IS DISTINCT FROM ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                               WHERE x.indrelid = fresh ORDER BY 1) THEN
            PERFORM cqrs._fail('CQ003', format(
                'rebuilding %s would rename its indexes (%s): give them the names PostgreSQL would choose',
                fresh, array_to_string(old_indexes, ', ')));
        END IF;
        swapped := swapped || fresh;
    END LOOP;
    EXECUTE format('DROP SCHEMA %I', r.shadow_schema);

    -- Every transaction below the new horizon is wholly in the shadow (cqrs._horizon).
    UPDATE cqrs.projections c
       SET last_position = r.last_position,
           applied_events = r.applied_events,
           horizon = greatest(c.horizon, cqrs._horizon(r.last_position, lim.fence)),
           final_position = greatest(c.final_position, r.final_position, lim.final_position),
           tables = swapped::text[],
           updated_at = now(),
           -- the rebuild applied every event up to its checkpoint: a halt at one of them
           -- is over, and its parked and skipped events are in the new read model
           state = CASE WHEN r.last_position >= c.failed_position THEN 'running' ELSE c.state END,
           failed_position = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_position END,
           failed_error = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_error END,
           failed_sqlstate = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_sqlstate END,
           failed_attempts = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_attempts END,
           failed_at = CASE WHEN r.last_position >= c.failed_position THEN NULL ELSE c.failed_at END
     WHERE c.name = projection;
    DELETE FROM cqrs.parked k WHERE k.projection = rebuild_finish.projection AND k.position <= r.last_position;
    DELETE FROM cqrs.rebuilds x WHERE x.projection = rebuild_finish.projection;
    RETURN r.applied_events;
END
$$;
