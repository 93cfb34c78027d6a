-- Before a rebuild reads its next events (cqrs.rebuild_step, cqrs.rebuild_finish,
-- cqrs.claim_batch with rebuild): refuses (CQ003) to read history the outbox no longer
-- holds (cqrs.prune dropped it), and for a rebuild from state, has cqrs.batch leave out
-- the events of transactions the loaded state's snapshot sees (they are in it) until its
-- checkpoint is past every one of them. Local to the caller's transaction.
CREATE OR REPLACE FUNCTION cqrs._rebuild_reads(r cqrs.rebuilds)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    start bigint := cqrs._history_start();
BEGIN
    IF start IS NOT NULL AND r.last_position < start - 1 THEN
        PERFORM cqrs._fail('CQ003', format(
            'the outbox''s history before position %s was pruned: projection %L can be rebuilt only from the '
            'write model''s state; declare its state function (cqrs.set_state_function), abandon this rebuild '
            '(cqrs-pg rebuild --abort %s) and rebuild again', start, r.projection, r.projection));
    END IF;
    PERFORM set_config('cqrs.loaded_snapshot',
                       CASE WHEN r.snapshot IS NOT NULL AND r.last_position < r.snapshot_position
                            THEN r.snapshot::text ELSE '' END,
                       true);
END
$$;
