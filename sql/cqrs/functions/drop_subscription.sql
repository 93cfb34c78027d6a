-- Removes a subscription, its place and its hold on the outbox's history with it; CQ002
-- when there is none of that name. A consumer polling it afterwards gets CQ002.
CREATE OR REPLACE FUNCTION cqrs.drop_subscription(name text)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL THEN
        PERFORM cqrs._fail('CQ001', 'name must not be null');
    END IF;
    DELETE FROM cqrs.subscriptions s WHERE s.name = drop_subscription.name;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('subscription %L does not exist', name));
    END IF;
END
$$;
