-- Per projection: checkpoint (and the transaction of the last event at or before it),
-- events not yet applied and the age of the oldest of them; its state ('running',
-- 'halted') with the event it halted at and the error, and its events set aside (parked,
-- skipped: cqrs.parked); and the session that holds it now (its row lock, cqrs._lock), if
-- any: normally a daemon applying a batch, else what stops it. Of that session, state and
-- seconds only when the caller's login may see them in pg_stat_activity.
-- jit off: the planner cannot know how far behind a projection is, and its guess for a
-- big outbox (a third of it) set off JIT compilation that cost 150 ms (measured).
CREATE OR REPLACE FUNCTION cqrs.projection_status()
RETURNS TABLE (
    name text,
    kind text,
    last_tx xid8,
    last_position bigint,
    horizon xid8,
    applied_events bigint,
    events_behind bigint,
    seconds_behind double precision,
    updated_at timestamptz,
    refreshed_at timestamptz,
    state text,
    on_error text,
    failed_position bigint,
    failed_event_type text,
    failed_error text,
    failed_sqlstate text,
    failed_attempts integer,
    failed_at timestamptz,
    parked bigint,
    skipped bigint,
    held_by_pid integer,
    held_by_user name,
    held_by_application text,
    held_by_state text,
    held_seconds double precision)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
    SELECT p.name, p.kind,
           (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position <= p.last_position ORDER BY o.position DESC LIMIT 1),
           p.last_position, p.horizon, p.applied_events,
           behind.n,
           coalesce(extract(epoch FROM clock_timestamp() - behind.oldest), 0)::double precision,
           p.updated_at, p.refreshed_at,
           p.state, p.on_error, p.failed_position,
           (SELECT o.event_type FROM cqrs.outbox o WHERE o.position = p.failed_position),
           p.failed_error, p.failed_sqlstate, p.failed_attempts, p.failed_at,
           (SELECT count(*) FROM cqrs.parked k WHERE k.projection = p.name AND k.outcome = 'parked'),
           (SELECT count(*) FROM cqrs.parked k WHERE k.projection = p.name AND k.outcome = 'skipped'),
           holder.pid, holder.usename, holder.application_name,
           CASE WHEN cqrs._may_see(holder.usesysid) THEN holder.state END,
           CASE WHEN cqrs._may_see(holder.usesysid)
                THEN extract(epoch FROM clock_timestamp() - holder.xact_start)::double precision END
      FROM cqrs.projections p
      LEFT JOIN LATERAL (
           SELECT a.pid, a.usename, a.usesysid, a.application_name, a.state, a.xact_start
             FROM pg_stat_activity a
            WHERE a.backend_xid = p.xmax AND p.xmax <> '0'::xid
            LIMIT 1) holder ON true
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, min(o.occurred_at) AS oldest
             FROM cqrs.outbox o
            WHERE o.position > p.last_position) behind
     ORDER BY p.name;
$$;
