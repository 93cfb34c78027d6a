-- The doorbell, rung by the outbox capture after each statement that appended events:
-- NOTIFY, but only while a daemon has said it is asleep (cqrs.listeners). A NOTIFY
-- serializes the commits of every notifying transaction in the cluster, so commands
-- under load, with the daemon awake, never send one (see DESIGN.md, wake-up).
-- It also refuses events from a transaction that the fence leaves out (a materialized
-- view's refresh, cqrs._exempt_from_fence): projections would never see them.
-- A function of its own so that `cqrs-pg bench` can swap it for its baselines.
CREATE OR REPLACE FUNCTION cqrs._ring_doorbell()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('cqrs.no_events', true) = 'on' THEN
        PERFORM cqrs._fail('CQ003', 'this transaction refreshes a materialized view projection, outside the fence: '
                                    'it must not write events (cqrs.no_events is on)');
    END IF;
    -- Asked once per transaction, by its first statement that appends events (a NOTIFY is
    -- sent at commit whichever statement asks): the later ones skip the table probe.
    IF current_setting('cqrs.doorbell_asked', true) = 'on' THEN
        RETURN;
    END IF;
    PERFORM set_config('cqrs.doorbell_asked', 'on', true);
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
END
$$;
