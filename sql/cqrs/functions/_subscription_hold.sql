-- How long a session handed a subscription's events holds them without a poll or an ack
-- of its own (cqrs._may_poll): a consumer that hangs gives them up after this, one whose
-- session ends gives them up at once.
CREATE OR REPLACE FUNCTION cqrs._subscription_hold()
RETURNS interval
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT interval '30 seconds';
$$;
