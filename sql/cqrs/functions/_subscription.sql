-- A subscription's row; CQ002 naming it when there is none (never created, or dropped),
-- CQ001 for a null name.
-- lock: take its row lock (waiting for another poll or ack of it to commit).
CREATE OR REPLACE FUNCTION cqrs._subscription(subscription text, lock boolean DEFAULT false)
RETURNS cqrs.subscriptions
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s cqrs.subscriptions;
BEGIN
    IF subscription IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'subscription must not be null');
    END IF;
    IF lock THEN
        SELECT * INTO s FROM cqrs.subscriptions x WHERE x.name = subscription FOR NO KEY UPDATE;
    ELSE
        SELECT * INTO s FROM cqrs.subscriptions x WHERE x.name = subscription;
    END IF;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format(
            'subscription %L does not exist: create it with cqrs.create_subscription', subscription));
    END IF;
    RETURN s;
END
$$;
