-- Whether this session may be handed subscription s's events: one consumer at a time. It
-- may unless another session holds events it was handed and has not acknowledged, while
-- that session runs and its hold (renewed by each of its polls and acks) lasts.
CREATE OR REPLACE FUNCTION cqrs._may_poll(s cqrs.subscriptions, me_pid integer, me_started timestamptz)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.holder_pid IS NULL
           OR s.delivered_position <= s.last_position
           OR (s.holder_pid = me_pid AND s.holder_started IS NOT DISTINCT FROM me_started)
           OR s.held_until < pg_catalog.now()
           OR NOT cqrs._session_alive(s.holder_pid, s.holder_started);
$$;
