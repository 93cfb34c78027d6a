-- `cqrs-pg skip PROJECTION --position N`: a projection halted at event N records it as
-- skipped (cqrs.parked, outcome 'skipped', with the error it failed with) and goes on
-- after it. Only the event it is halted at can be skipped: CQ003, changing nothing, when
-- the projection is not halted or halted at another event; CQ002 for an unknown
-- projection. Waits for a daemon's batch of the projection in hand to commit.
CREATE OR REPLACE FUNCTION cqrs.skip_event(projection text, "position" bigint)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    skipped cqrs.outbox;
BEGIN
    p := cqrs._projection(projection);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR UPDATE;
    IF p.state <> 'halted' THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not halted: only the event a halted projection stopped at can be skipped', projection));
    END IF;
    IF skip_event.position IS DISTINCT FROM p.failed_position THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is halted at event %s, not %s: only that event can be skipped',
            projection, p.failed_position, coalesce(skip_event.position::text, 'NULL')));
    END IF;
    SELECT * INTO skipped FROM cqrs.outbox o WHERE o.position = p.failed_position;
    INSERT INTO cqrs.parked (projection, position, event_type, outcome, error, sqlstate, attempts)
    VALUES (projection, p.failed_position, coalesce(skipped.event_type, '?'), 'skipped',
            p.failed_error, p.failed_sqlstate, p.failed_attempts)
    ON CONFLICT ON CONSTRAINT parked_pkey DO UPDATE
       SET outcome = 'skipped', error = excluded.error, sqlstate = excluded.sqlstate,
           attempts = excluded.attempts, at = now(), retry = false;
    PERFORM cqrs._advance_checkpoint(projection, false, p.failed_position, 0, false,
                                     p.final_position, cqrs._fence(pg_current_snapshot()), NULL);
    PERFORM pg_notify('cqrs_outbox', '');
END
$$;
