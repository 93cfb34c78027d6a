-- The daemon's report that the event after checkpoint after_position failed `attempts`
-- more times, the last with error (sqlstate: NULL for a python handler's exception), after
-- its retries and with the batch narrowed to that one event. Acts by the projection's
-- on_error: 'halt' records the failure and the projection stays at the event (the daemon
-- stops running it; past it, cqrs._advance_checkpoint makes it run again); 'park' records
-- the event in cqrs.parked and moves the checkpoint past it, in this transaction. Returns
-- what it did (outcome 'halted' or 'parked', with the event's position and type), or
-- 'moved' when the checkpoint is no longer after_position (another daemon got past the
-- event): nothing to do.
CREATE OR REPLACE FUNCTION cqrs.projection_failed(
    projection text, after_position bigint, error text, sqlstate text, attempts integer,
    OUT outcome text, OUT "position" bigint, OUT event_type text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
    failed cqrs.outbox;
    lim record;
    message text := left(coalesce(error, 'unknown error'), 2000);
    code text := left(sqlstate, 5);
BEGIN
    PERFORM cqrs._require_range('attempts', attempts, 1);
    p := cqrs._projection(projection);
    PERFORM cqrs._lock('projection', projection, true);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    outcome := 'moved';
    IF p.last_position IS DISTINCT FROM after_position THEN
        RETURN;
    END IF;
    -- the limit every reader shares: the projection's own final_position may lag it (a
    -- failed batch stored nothing)
    SELECT * INTO lim FROM cqrs._read_limit();
    SELECT * INTO failed
      FROM cqrs.outbox o
     WHERE o.position > p.last_position AND o.position <= lim.final_position
     ORDER BY o.position
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    "position" := failed.position;
    event_type := failed.event_type;
    IF p.on_error = 'park' THEN
        INSERT INTO cqrs.parked (projection, position, event_type, outcome, error, sqlstate, attempts)
        VALUES (projection, failed.position, failed.event_type, 'parked', message, code, attempts)
        ON CONFLICT ON CONSTRAINT parked_pkey DO UPDATE
           SET outcome = 'parked', error = excluded.error, sqlstate = excluded.sqlstate,
               attempts = cqrs.parked.attempts + excluded.attempts, at = now(), retry = false;
        PERFORM cqrs._advance_checkpoint(projection, false, failed.position, 0, false,
                                         lim.final_position, lim.fence, NULL);
        outcome := 'parked';
        RETURN;
    END IF;
    UPDATE cqrs.projections c
       SET state = 'halted',
           failed_attempts = CASE WHEN c.failed_position = failed.position
                                  THEN c.failed_attempts + attempts ELSE attempts END,
           failed_position = failed.position,
           failed_error = message,
           failed_sqlstate = code,
           failed_at = now(),
           updated_at = now()
     WHERE c.name = projection;
    outcome := 'halted';
END
$$;
