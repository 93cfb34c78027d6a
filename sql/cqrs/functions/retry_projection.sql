-- `cqrs-pg retry PROJECTION`: a halted projection runs again, trying its failing event
-- anew, and its parked events are queued for the daemon to apply again (cqrs.claim_parked).
-- Returns the event it was halted at (NULL: it was running) and how many parked events
-- were queued. CQ002 for an unknown projection; CQ003, changing nothing, when there is
-- nothing to retry.
CREATE OR REPLACE FUNCTION cqrs.retry_projection(projection text, OUT halted_at bigint, OUT queued integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    p := cqrs._projection(projection);
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection FOR UPDATE;
    halted_at := p.failed_position;
    UPDATE cqrs.projections c
       SET state = 'running', failed_position = NULL, failed_error = NULL, failed_sqlstate = NULL,
           failed_attempts = NULL, failed_at = NULL, updated_at = now()
     WHERE c.name = projection AND c.state = 'halted';
    UPDATE cqrs.parked k SET retry = true
     WHERE k.projection = retry_projection.projection AND k.outcome = 'parked' AND NOT k.retry;
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF halted_at IS NULL AND queued = 0 THEN
        PERFORM cqrs._fail('CQ003', format(
            'projection %L is not halted and has no parked events to apply again: nothing to retry', projection));
    END IF;
    -- wake a sleeping daemon
    PERFORM pg_notify('cqrs_outbox', '');
END
$$;
