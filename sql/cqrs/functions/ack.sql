-- Acknowledges the event of `cursor` (as cqrs.poll handed it out) and every one before
-- it: the subscription's next poll starts after it. An ack of what is acknowledged
-- already changes nothing. Any session may ack (a consumer on a pool of connections); an
-- ack of all that was handed out ends the hold (cqrs._may_poll), and one of part of it
-- renews it. CQ001 for a cursor no poll of this subscription handed out, CQ002 when the
-- subscription does not exist.
CREATE OR REPLACE FUNCTION cqrs.ack(subscription text, cursor text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s cqrs.subscriptions;
    pos bigint;
BEGIN
    pos := cqrs._cursor_position(cursor);
    s := cqrs._subscription(subscription);
    IF pos <= s.last_position THEN
        RETURN;  -- acknowledged already
    END IF;
    s := cqrs._subscription(subscription, true);
    IF pos > s.delivered_position THEN
        PERFORM cqrs._fail('CQ001', format(
            'cursor %s is beyond the last event handed out by a poll of subscription %L (%s): '
            'acknowledge only cursors cqrs.poll returned', cursor, subscription, s.delivered_position));
    ELSIF pos <= s.last_position THEN
        RETURN;
    END IF;
    UPDATE cqrs.subscriptions x
       SET last_position = pos,
           acked_events = x.acked_events + (SELECT count(*) FROM cqrs.outbox o
                                             WHERE o.position > x.last_position AND o.position <= pos
                                               AND cqrs._subscribed(x.event_types, x.aggregate_types,
                                                                    o.event_type, o.aggregate_type)),
           acked_at = now(),
           holder_pid = CASE WHEN pos >= x.delivered_position THEN NULL ELSE x.holder_pid END,
           holder_started = CASE WHEN pos >= x.delivered_position THEN NULL ELSE x.holder_started END,
           held_until = CASE WHEN pos >= x.delivered_position THEN NULL ELSE now() + cqrs._subscription_hold() END
     WHERE x.name = s.name;
END
$$;
