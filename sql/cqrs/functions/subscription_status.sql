-- Per subscription: its filter, the cursor (last_position) and the last event handed out,
-- events of its filter not yet acknowledged and the age of the oldest of them, events
-- acknowledged so far, and the session holding events it was handed (while it holds
-- them), with when it last polled and acked. For `cqrs-pg status`.
-- jit off, as in cqrs.projection_status: the planner cannot know how far behind it is.
CREATE OR REPLACE FUNCTION cqrs.subscription_status()
RETURNS TABLE (
    name text,
    event_types text[],
    aggregate_types text[],
    last_position bigint,
    delivered_position bigint,
    events_behind bigint,
    seconds_behind double precision,
    acked_events bigint,
    held_by_pid integer,
    held_until timestamptz,
    created_at timestamptz,
    polled_at timestamptz,
    acked_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
    SELECT s.name, s.event_types, s.aggregate_types, s.last_position, s.delivered_position,
           behind.n, coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           s.acked_events,
           CASE WHEN s.delivered_position > s.last_position AND s.held_until >= now()
                     AND cqrs._session_alive(s.holder_pid, s.holder_started) THEN s.holder_pid END,
           CASE WHEN s.delivered_position > s.last_position THEN s.held_until END,
           s.created_at, s.polled_at, s.acked_at
      FROM cqrs.subscriptions s
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE o.position > s.last_position
              AND cqrs._subscribed(s.event_types, s.aggregate_types, o.event_type, o.aggregate_type)) behind
     ORDER BY s.name;
$$;
