-- cqrs_0015: a poll reads how far it may read before it waits for the subscription's
-- row; when an event became final and was handed out and acknowledged meanwhile, past
-- that limit, the waiting poll's scan started from the acknowledged position and then
-- fell back to the older limit, and stored it as the cursor: the next poll handed the
-- acknowledged events out again. The scan no longer goes below where it started.

-- sql/cqrs/functions/poll.sql
-- The next events of a subscription after its last acknowledged one: at most max_events,
-- gap-free and in position order (per aggregate, the order of its versions), up to the
-- final position as every projection reads (cqrs._read_limit), only those of its filter,
-- payloads in their newest shape (cqrs.batch). Each comes with the outbox's columns and a
-- cursor for cqrs.ack. Until they are acknowledged, a poll hands out the same events again.
--
-- One consumer at a time (cqrs._may_poll): the session handed events holds them until it
-- acknowledges them all, its session ends, or its hold (cqrs._subscription_hold) passes
-- without a poll or an ack of its; meanwhile other sessions' polls wait for a running poll and then receive
-- nothing. Events outside the filter are passed over: the cursor moves past them.
-- A poll with nothing to hand out writes nothing, unless a mark is due (as a projection
-- stores one, cqrs._needs_mark), so that events committed while others run become readable.
--
-- after: a cursor this session was handed and has not acknowledged yet: the events after
-- it instead, so that a consumer fetches its next batch while it still works on the one
-- before (the relay: while the broker stores it); the cursor stays where it is.
CREATE OR REPLACE FUNCTION cqrs.poll(subscription text, max_events integer DEFAULT 100, after text DEFAULT NULL)
RETURNS TABLE ("position" bigint, tx_id xid8, event_type text, aggregate_type text, aggregate_id uuid,
               aggregate_version integer, payload jsonb, metadata jsonb, occurred_at timestamptz,
               payload_version integer, cursor text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- cqrs.batch reads a rebuild's setting: nothing a consumer sets may hide events from it
SET cqrs.loaded_snapshot = ''
AS $$
DECLARE
    window_size constant bigint := 100000::bigint;
    scan_limit constant bigint := 1000000::bigint;
    s cqrs.subscriptions;
    lim record;
    me_pid integer := pg_backend_pid();
    me_started timestamptz;
    scanned bigint;
    start bigint;
    next_pos bigint;
    covered bigint := 0::bigint;
    window_end bigint;
    first_pos bigint;
    last_pos bigint;
    n bigint := 0::bigint;
    marking boolean;
    now_xmax xid8;
BEGIN
    PERFORM cqrs._require_range('max_events', max_events, 1, 100000);
    -- before any lock, with no xid yet: the position _read_limit reads can be a mark
    SELECT * INTO lim FROM cqrs._read_limit();
    s := cqrs._subscription(subscription);
    -- A transaction reads the list of sessions once and keeps it (pg_stat_get_activity):
    -- read it afresh, or a holder that connected since would count as gone.
    PERFORM pg_stat_clear_snapshot();
    SELECT a.backend_start INTO me_started FROM pg_stat_get_activity(me_pid) a;
    marking := cqrs._needs_mark(s.mark_xmax, lim.final_position, lim.fence, lim.mark_position, lim.pending_position);
    -- Read alone when there is nothing to do: no xid, no WAL.
    IF NOT cqrs._may_poll(s, me_pid, me_started)
       OR (lim.final_position <= s.last_position AND NOT marking) THEN
        RETURN;
    END IF;
    s := cqrs._subscription(subscription, true);
    PERFORM pg_stat_clear_snapshot();  -- sessions may have connected while it waited
    IF NOT cqrs._may_poll(s, me_pid, me_started) THEN
        RETURN;  -- another consumer's poll got there first
    END IF;

    IF after IS NOT NULL THEN
        start := cqrs._cursor_position(after);
        IF start < s.last_position OR start > s.delivered_position
           OR s.holder_pid IS DISTINCT FROM me_pid OR s.holder_started IS DISTINCT FROM me_started THEN
            PERFORM cqrs._fail('CQ001', format(
                'after must be a cursor this session was handed by a poll of subscription %L and has not '
                'acknowledged (%s to %s), got %s', subscription, s.last_position, s.delivered_position, after));
        END IF;
    END IF;

    -- Windows of positions, so that a filter matching few events costs a bounded scan per
    -- poll; the cursor passes what was scanned and matched nothing. Each window starts at
    -- the next event, so no stretch of positions without one (pruned, rolled back) makes
    -- a poll come back empty while events follow.
    scanned := coalesce(start, s.last_position);
    LOOP
        SELECT o.position - 1 INTO next_pos
          FROM cqrs.outbox o
         WHERE o.position > scanned AND o.position <= lim.final_position
         ORDER BY o.position
         LIMIT 1;
        -- lim was read before the row's lock: an acknowledgement committed meanwhile may
        -- be past it, and the scan never goes back below where it started
        scanned := coalesce(next_pos, greatest(lim.final_position, scanned));
        window_end := least(lim.final_position, scanned + window_size);
        EXIT WHEN window_end <= scanned;
        SELECT min(x.position), max(x.position), count(*) INTO first_pos, last_pos, n
          FROM (SELECT o.position
                  FROM cqrs.outbox o
                 WHERE o.position > scanned AND o.position <= window_end
                   AND cqrs._subscribed(s.event_types, s.aggregate_types, o.event_type, o.aggregate_type)
                 ORDER BY o.position
                 LIMIT max_events) x;
        covered := covered + (window_end - scanned);
        scanned := window_end;
        EXIT WHEN n > 0 OR covered >= scan_limit;
    END LOOP;

    IF n = 0 AND (scanned = s.last_position OR start IS NOT NULL) AND NOT marking THEN
        RETURN;
    END IF;
    now_xmax := pg_snapshot_xmax(pg_current_snapshot());
    UPDATE cqrs.subscriptions x
       SET last_position = CASE WHEN start IS NOT NULL THEN x.last_position
                                WHEN n > 0 THEN first_pos - 1 ELSE scanned END,
           -- its own poll again, of fewer events, keeps what it was handed acknowledgeable
           delivered_position = CASE WHEN n = 0 THEN greatest(x.delivered_position, scanned)
                                     WHEN x.holder_pid = me_pid AND x.holder_started IS NOT DISTINCT FROM me_started
                                     THEN greatest(x.delivered_position, last_pos)
                                     ELSE last_pos END,
           holder_pid = CASE WHEN n > 0 OR start IS NOT NULL THEN me_pid END,
           holder_started = CASE WHEN n > 0 OR start IS NOT NULL THEN me_started END,
           held_until = CASE WHEN n > 0 OR start IS NOT NULL THEN now() + cqrs._subscription_hold() END,
           polled_at = CASE WHEN n > 0 THEN now() ELSE x.polled_at END,
           final_position = greatest(x.final_position, lim.final_position),
           mark_xmax = CASE WHEN lim.mark_position IS NOT NULL AND cqrs._mark_replaceable(x.mark_xmax, lim.fence, now_xmax)
                            THEN pg_current_xact_id() ELSE x.mark_xmax END,
           mark_position = CASE WHEN lim.mark_position IS NOT NULL AND cqrs._mark_replaceable(x.mark_xmax, lim.fence, now_xmax)
                                THEN lim.mark_position ELSE x.mark_position END
     WHERE x.name = s.name;
    IF n = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT b.position, b.tx_id, b.event_type, b.aggregate_type, b.aggregate_id, b.aggregate_version,
               b.payload, b.metadata, b.occurred_at, b.payload_version, b.position::text
          FROM cqrs.batch(first_pos - 1, last_pos) b
         WHERE cqrs._subscribed(s.event_types, s.aggregate_types, b.event_type, b.aggregate_type)
         ORDER BY b.position;
END
$$;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0015';

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
