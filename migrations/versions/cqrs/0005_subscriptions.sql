-- cqrs_0005: events for other services. Subscriptions read the outbox as projections do
-- (cqrs.create_subscription, cqrs.poll, cqrs.ack, cqrs.drop_subscription), for any SQL
-- client and for the relay to NATS JetStream; the group role cqrs_consumer may use them
-- and nothing else. Subscriptions keep marks as every reader does, and pruning keeps
-- what one has not passed.

-- the new group role (sql/cqrs/roles.sql): cluster-wide, so perhaps there already
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'cqrs_consumer') THEN
        CREATE ROLE cqrs_consumer NOLOGIN;
    END IF;
END
$$;

-- sql/cqrs/tables/subscriptions.sql
-- One row per subscription: a consumer's place in the outbox, for any SQL client
-- (cqrs.create_subscription, cqrs.poll, cqrs.ack, cqrs.drop_subscription) and the relay.
-- It reads as a projection does, in position order up to the final position, so it keeps
-- a mark and a final position of its own (cqrs._read_limit) and holds back pruning
-- (cqrs.prune) until it has passed an event.
CREATE TABLE cqrs.subscriptions (
    name               text PRIMARY KEY,
    -- only events of these types and aggregate types (NULL: all)
    event_types        text[],
    aggregate_types    text[],
    -- the cursor: every event at or below last_position is acknowledged, or outside the
    -- filter; a poll hands out the events after it
    last_position      bigint NOT NULL,
    -- the last event the latest poll handed out (at or above last_position); an ack may
    -- go no further
    delivered_position bigint NOT NULL,
    -- the session holding events it was handed and has not acknowledged: until it acks
    -- them, its session ends or held_until passes, other sessions' polls receive nothing
    holder_pid         integer,
    holder_started     timestamptz,
    held_until         timestamptz,
    -- as in cqrs.projections: how far reading may go, as this reader found it
    final_position     bigint NOT NULL DEFAULT 0,
    mark_xmax          xid8,
    mark_position      bigint,
    acked_events       bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.now(),
    polled_at          timestamptz,
    acked_at           timestamptz,
    CONSTRAINT subscriptions_delivered CHECK (delivered_position >= last_position)
);

-- sql/cqrs/functions/_read_limit.sql
-- How far every reader may read the outbox now: final_position, the highest position at
-- or below which every event is final (its transaction has ended, and no transaction can
-- still add one there). Also the fence, the position to store as this transaction's mark
-- (mark_position: NULL when it cannot be one), and the highest mark stored that is not
-- usable yet (pending_position).
--
-- A transaction takes positions only after its xid (a capture trigger runs after its
-- statement's writes). A mark is a position read from the outbox's sequence by a
-- transaction that had no xid yet, stored with the xid it then took (a reader's, when it
-- commits a batch, cqrs._advance_checkpoint; a daemon's before a round, cqrs.take_mark;
-- each in its own row): every transaction that took a position up to mark_position had
-- its xid before that one, so once no transaction below mark_xmax runs (mark_xmax <= the
-- fence), every position up to mark_position is final.
-- The position read now is final at once when no transaction runs at all: none in the
-- snapshot, and no xid handed out at or above its xmax. See sql/cqrs/DESIGN.md.
CREATE OR REPLACE FUNCTION cqrs._read_limit(
    OUT final_position bigint, OUT fence xid8, OUT mark_position bigint, OUT pending_position bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    snap pg_snapshot;
    now_final bigint;
BEGIN
    -- Sessions that cache positions take them out of order: marks, and version order
    -- within an aggregate, need each one taken from the sequence itself.
    IF (SELECT s.seqcache FROM pg_sequence s WHERE s.seqrelid = 'cqrs.outbox_position_seq'::regclass) <> 1 THEN
        PERFORM cqrs._fail('CQ003', 'sequence cqrs.outbox_position_seq must not cache values: '
                                    'ALTER SEQUENCE cqrs.outbox_position_seq CACHE 1');
    END IF;
    IF pg_current_xact_id_if_assigned() IS NULL
       AND current_setting('transaction_isolation') = 'read committed' THEN
        mark_position := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    END IF;
    -- a statement of its own: READ COMMITTED takes its snapshot after the position was read
    snap := pg_current_snapshot();
    fence := cqrs._fence(snap);
    IF fence = pg_snapshot_xmax(snap) AND NOT cqrs._xid_assigned(pg_snapshot_xmax(snap)) THEN
        now_final := mark_position;
    END IF;
    SELECT greatest(max(r.final_position), max(r.mark_position) FILTER (WHERE r.mark_xmax <= fence)),
           -- a stored xid at or above xmax is not one of this cluster's (a logical restore's)
           max(r.mark_position) FILTER (WHERE r.mark_xmax > fence AND r.mark_xmax < pg_snapshot_xmax(snap))
      INTO final_position, pending_position
      FROM (SELECT p.final_position, p.mark_xmax, p.mark_position FROM cqrs.projections p
            UNION ALL
            SELECT b.final_position, b.mark_xmax, b.mark_position FROM cqrs.rebuilds b
            UNION ALL
            SELECT l.final_position, l.mark_xmax, l.mark_position FROM cqrs.listeners l
            UNION ALL
            SELECT s.final_position, s.mark_xmax, s.mark_position FROM cqrs.subscriptions s) r;
    final_position := greatest(final_position, now_final, 0);
END
$$;

-- sql/cqrs/functions/prune.sql
-- Drops the outbox's oldest partitions while each holds only history that every reader
-- has passed and whose newest event is older than keep: every projection's checkpoint
-- (and a rebuild's) and every subscription's cursor is at or past its last position, no event in it is parked (a retry
-- reads it again), and it lies wholly below the last position handed out. Stops at the
-- first partition it must keep, so what remains is one unbroken stretch of history
-- (cqrs._history_start). Returns the partitions it dropped, or with dry_run those it
-- would drop, changing nothing (events: as the planner counts them, once analyzed). A partition is dropped whole (DROP TABLE: a brief ACCESS
-- EXCLUSIVE lock on the outbox, waited for at most lock_timeout), never emptied by DELETE.
CREATE OR REPLACE FUNCTION cqrs.prune(keep interval, dry_run boolean DEFAULT false)
RETURNS TABLE (partition text, first_position bigint, end_position bigint, events bigint, bytes bigint,
               newest_event timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    passed bigint;
    last bigint;
    part record;
    bounds record;
BEGIN
    IF keep IS NULL OR keep < interval '0' THEN
        PERFORM cqrs._fail('CQ001', format('keep must be a duration of 0 or more, not %s', coalesce(keep::text, 'null')));
    END IF;
    dry_run := coalesce(dry_run, false);
    IF NOT dry_run THEN
        PERFORM cqrs.extend_outbox();  -- the default partition's events into a range partition
    END IF;
    last := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    SELECT least((SELECT min(p.last_position) FROM cqrs.projections p),
                 (SELECT min(b.last_position) FROM cqrs.rebuilds b),
                 -- a subscription's cursor passes the events outside its filter too
                 (SELECT min(s.last_position) FROM cqrs.subscriptions s),
                 (SELECT min(k.position) - 1 FROM cqrs.parked k WHERE k.outcome = 'parked'),
                 (SELECT l.final_position FROM cqrs._read_limit() l))
      INTO passed;
    FOR part IN SELECT p.partition FROM cqrs._outbox_partitions() p LOOP
        SELECT b.first_position, b.end_position INTO bounds FROM cqrs._partition_bounds(part.partition) b;
        EXIT WHEN bounds.end_position - 1 > passed OR bounds.end_position > last;
        partition := part.partition::text;
        first_position := bounds.first_position;
        end_position := bounds.end_position;
        SELECT o.occurred_at INTO newest_event
          FROM cqrs.outbox o
         WHERE o.position >= coalesce(bounds.first_position, -9223372036854775808) AND o.position < bounds.end_position
         ORDER BY o.position DESC
         LIMIT 1;
        EXIT WHEN newest_event >= now() - keep;
        -- the planner's count once the partition was analyzed (autovacuum does): a prune
        -- costs the same whatever the partitions hold; counted while it never was
        SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END INTO events
          FROM pg_class c WHERE c.oid = part.partition;
        IF events IS NULL THEN
            SELECT count(*) INTO events
              FROM cqrs.outbox o
             WHERE o.position >= coalesce(bounds.first_position, -9223372036854775808) AND o.position < bounds.end_position;
        END IF;
        bytes := pg_total_relation_size(part.partition);
        IF NOT dry_run THEN
            EXECUTE format('DROP TABLE %s', part.partition);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- sql/cqrs/functions/_xids_moved.sql
-- Whether the engine holds transaction ids of another cluster's, ahead of this one's (a
-- logical restore: cqrs.adopt_cluster). A healthy cluster's stored ids are all below its
-- next xid. Reads the small tables only (as the owner: status runs it as the listener).
CREATE OR REPLACE FUNCTION cqrs._xids_moved()
RETURNS boolean
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.projections c
                    WHERE c.horizon >= pg_snapshot_xmax(pg_current_snapshot())
                       OR c.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.rebuilds r WHERE r.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()))
        OR EXISTS (SELECT 1 FROM cqrs.subscriptions s WHERE s.mark_xmax >= pg_snapshot_xmax(pg_current_snapshot()));
$$;

-- sql/cqrs/functions/adopt_cluster.sql
-- After a logical dump and restore (pg_dump / pg_restore) into another cluster, the
-- transaction ids the engine stored — horizons, marks, receipts' tokens — are the old
-- cluster's. Where they are ahead of this cluster's (at or above its next xid), they would
-- say transactions not yet applied were (cqrs.caught_up) and hold marks that never become
-- usable. This rebases them: horizons back to the start (each recomputed at the next batch
-- or poll), those marks dropped (subscriptions' too), the old daemons' rows forgotten, old receipts' tokens to
-- one every horizon passes. Positions are untouched: reading goes on exactly where each
-- projection's checkpoint is, so no event is skipped or applied twice. Returns the rows
-- it changed (0: the ids had not moved). The daemon calls it as it connects; an operator
-- may call it at once after a restore.
CREATE OR REPLACE FUNCTION cqrs.adopt_cluster()
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    next_xid xid8 := pg_snapshot_xmax(pg_current_snapshot());
    changed bigint := 0::bigint;
    n bigint;
BEGIN
    IF NOT cqrs._xids_moved() THEN
        RETURN 0::bigint;
    END IF;
    -- one adopter at a time; what a concurrent daemon changes meanwhile is rebased after it
    LOCK TABLE cqrs.projections IN SHARE ROW EXCLUSIVE MODE;
    UPDATE cqrs.projections c
       SET horizon = '3', horizon_position = 0,
           mark_xmax = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_xmax END,
           mark_position = CASE WHEN c.mark_xmax >= next_xid THEN NULL ELSE c.mark_position END,
           updated_at = now()
     WHERE c.horizon >= next_xid OR c.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.rebuilds r SET mark_xmax = NULL, mark_position = NULL WHERE r.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    DELETE FROM cqrs.listeners l WHERE l.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.subscriptions s SET mark_xmax = NULL, mark_position = NULL WHERE s.mark_xmax >= next_xid;
    GET DIAGNOSTICS n = ROW_COUNT;
    changed := changed + n;
    UPDATE cqrs.commands m SET token = 3 WHERE m.token >= next_xid::text::bigint;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN changed + n;
END
$$;

-- sql/cqrs/functions/_subscription_hold.sql
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

-- sql/cqrs/functions/_session_alive.sql
-- Whether the session that began with backend pid at `started` still runs (pids are
-- reused: the start time tells two sessions apart; when the owner may not see it, NULL,
-- the pid alone).
CREATE OR REPLACE FUNCTION cqrs._session_alive(pid integer, started timestamptz)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_stat_get_activity(_session_alive.pid) a
                    WHERE a.backend_start IS NOT DISTINCT FROM started OR started IS NULL);
$$;

-- sql/cqrs/functions/_subscription.sql
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

-- sql/cqrs/functions/_may_poll.sql
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

-- sql/cqrs/functions/_cursor_position.sql
-- The position a cursor (as cqrs.poll hands it out) stands for; CQ001 for anything else.
CREATE OR REPLACE FUNCTION cqrs._cursor_position(cursor text)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF cursor IS NULL OR cursor !~ '^[0-9]{1,18}$' THEN
        PERFORM cqrs._fail('CQ001', format(
            'cursor must be one that cqrs.poll returned, got %s', coalesce(quote_literal(left(cursor, 40)), 'NULL')));
    END IF;
    RETURN cursor::bigint;
END
$$;

-- sql/cqrs/functions/_subscribed.sql
-- Whether an event of event_type and aggregate_type passes a subscription's filter (its
-- event_types and aggregate_types; NULL: every type). No SET clause, so the planner
-- inlines it into each query: the filter stays one expression over the outbox's columns.
CREATE OR REPLACE FUNCTION cqrs._subscribed(event_types text[], aggregate_types text[],
                                            event_type text, aggregate_type text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT (event_types IS NULL OR event_type OPERATOR(pg_catalog.=) ANY (event_types))
       AND (aggregate_types IS NULL OR aggregate_type OPERATOR(pg_catalog.=) ANY (aggregate_types));
$$;

-- sql/cqrs/functions/_require_types.sql
-- A subscription's filter argument (argument: its name) as stored: NULL (every type), or
-- its types trimmed, each checked as cqrs._require_text checks a text; CQ001 for an empty
-- list or a bad type, naming it.
CREATE OR REPLACE FUNCTION cqrs._require_types(argument text, types text[])
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF types IS NULL THEN
        RETURN NULL;
    ELSIF cardinality(types) = 0 THEN
        PERFORM cqrs._fail('CQ001', format('%s must list at least one type, or be NULL for all', argument));
    END IF;
    RETURN ARRAY(SELECT cqrs._require_text(format('%s[%s]', argument, i), types[i], 200)
                   FROM generate_subscripts(types, 1) AS i ORDER BY i);
END
$$;

-- sql/cqrs/functions/create_subscription.sql
-- A new subscription: a consumer's place in the outbox, read with cqrs.poll and moved
-- with cqrs.ack. event_types, aggregate_types: only events of these (NULL: all). It
-- starts at the final position (cqrs._read_limit): every event committed after this call
-- is handed out (when other transactions run now, so may a few committed just before);
-- from_beginning: at the oldest event the outbox still holds (cqrs.prune drops history no
-- reader needs). CQ001 for a bad name or filter, CQ003 when the name is taken.
CREATE OR REPLACE FUNCTION cqrs.create_subscription(
    name text, event_types text[] DEFAULT NULL, aggregate_types text[] DEFAULT NULL,
    from_beginning boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    start bigint;
BEGIN
    -- stored trimmed, as they are checked: a type with spaces around it would match nothing
    name := cqrs._require_text('name', name, 200);
    event_types := cqrs._require_types('event_types', event_types);
    aggregate_types := cqrs._require_types('aggregate_types', aggregate_types);
    SELECT * INTO lim FROM cqrs._read_limit();
    start := CASE WHEN from_beginning THEN greatest(coalesce(cqrs._history_start() - 1, 0), 0)
                  ELSE lim.final_position END;
    INSERT INTO cqrs.subscriptions (name, event_types, aggregate_types, last_position, delivered_position, final_position)
    VALUES (name, event_types, aggregate_types, start, start, lim.final_position)
    ON CONFLICT ON CONSTRAINT subscriptions_pkey DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format(
            'subscription %L already exists: choose another name, or drop it first with cqrs.drop_subscription', name));
    END IF;
END
$$;

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
        scanned := coalesce(next_pos, lim.final_position);
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

-- sql/cqrs/functions/ack.sql
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

-- sql/cqrs/functions/drop_subscription.sql
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

-- sql/cqrs/functions/subscription_status.sql
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

-- privileges: as sql/cqrs/privileges.sql grants them
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cqrs.subscription_status() TO cqrs_listener;
GRANT USAGE ON SCHEMA cqrs TO cqrs_consumer;
GRANT EXECUTE ON FUNCTION
    cqrs.create_subscription(text, text[], text[], boolean),
    cqrs.poll(text, integer, text),
    cqrs.ack(text, text),
    cqrs.drop_subscription(text)
TO cqrs_consumer;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0005';
