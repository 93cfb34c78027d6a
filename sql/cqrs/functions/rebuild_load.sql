-- Loads a rebuild's shadow tables from the write model's current state: runs the
-- projection's state function into them, under this transaction's one snapshot (hence
-- REPEATABLE READ or SERIALIZABLE, refused otherwise), right after cqrs.rebuild_begin.
-- The rebuild then goes on from the log exactly where that snapshot leaves off: from the
-- final position (every event up to it is in the snapshot), applying only the events of
-- transactions the snapshot does not see (cqrs._rebuild_reads), so that no event is in
-- the new read model twice or not at all, however writers run meanwhile. Needs no
-- history: the rebuild reads the log only from the final position on. Returns that
-- position.
CREATE OR REPLACE FUNCTION cqrs.rebuild_load(projection text)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r cqrs.rebuilds;
    p cqrs.projections;
    lim record;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        PERFORM cqrs._fail('CQ003', 'cqrs.rebuild_load reads the write model under one snapshot: call it in a '
                                    'REPEATABLE READ transaction (BEGIN ISOLATION LEVEL REPEATABLE READ)');
    END IF;
    -- every position up to final_position was taken by a transaction that had ended when
    -- this transaction's snapshot was taken (its first statement)
    SELECT * INTO lim FROM cqrs._read_limit();
    IF NOT cqrs._lock('rebuild', projection, true) THEN
        PERFORM cqrs._fail('CQ002', format('no rebuild of projection %L is in progress', projection));
    END IF;
    SELECT * INTO r FROM cqrs.rebuilds x WHERE x.projection = rebuild_load.projection;
    p := cqrs._projection(projection);
    IF p.state_function IS NULL THEN
        PERFORM cqrs._fail('CQ001', format(
            'projection %L declares no state function (cqrs.set_state_function): it is rebuilt from the event log',
            projection));
    ELSIF r.last_position <> 0 OR r.snapshot IS NOT NULL THEN
        PERFORM cqrs._fail('CQ003', format(
            'the rebuild of projection %L has read events already: load state only right after cqrs.rebuild_begin',
            projection));
    END IF;
    PERFORM cqrs._load_state(p.state_function::regproc, quote_ident(r.shadow_schema));
    UPDATE cqrs.rebuilds x
       SET last_position = lim.final_position,
           final_position = greatest(x.final_position, lim.final_position),
           snapshot = pg_current_snapshot(),
           -- read after the snapshot: every transaction it sees took its positions before
           snapshot_position = coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0)
     WHERE x.projection = rebuild_load.projection;
    RETURN lim.final_position;
END
$$;
