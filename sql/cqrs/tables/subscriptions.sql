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
