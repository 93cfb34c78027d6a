-- The append-only event log, written only by the capture triggers (cqrs.capture_changes) in the command's transaction.
-- position is taken at insert, under the row locks of the writing transaction: it follows
-- version order within an aggregate, and every reader reads in position order, but only
-- up to the final position (cqrs._read_limit): an event is appended before its
-- transaction commits, so a later position can be visible while an earlier one is not yet.
-- The sequence must not cache values (cqrs._read_limit refuses one that does).
-- tx_id is the writing transaction (a command's receipt token) for cqrs.caught_up.
-- Partitioned by position, so that history leaves by dropping whole partitions
-- (cqrs.prune), never by a DELETE; cqrs.extend_outbox keeps partitions ready ahead of the
-- sequence, and the default partition takes what comes beyond them until it runs again.
CREATE SEQUENCE cqrs.outbox_position_seq AS bigint CACHE 1;
CREATE TABLE cqrs.outbox (
    position          bigint NOT NULL DEFAULT pg_catalog.nextval('cqrs.outbox_position_seq'::regclass),
    tx_id             xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    event_type        text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      uuid NOT NULL,
    aggregate_version integer NOT NULL,
    payload           jsonb NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- the version of the payload's shape (its table's columns), as cqrs.capture_changes
    -- was told; readers get it upcast to the newest (cqrs.register_upcaster)
    payload_version   integer NOT NULL DEFAULT 1,
    CONSTRAINT outbox_pkey PRIMARY KEY (position)
) PARTITION BY RANGE (position);
ALTER SEQUENCE cqrs.outbox_position_seq OWNED BY cqrs.outbox.position;
CREATE TABLE cqrs.outbox_default PARTITION OF cqrs.outbox DEFAULT;
