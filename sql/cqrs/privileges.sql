-- Least privilege for the cqrs core: no function is executable by PUBLIC; each group role
-- gets only what its users need. SECURITY DEFINER functions do the rest as the owner.
-- An application's own grants (its commands to cqrs_writer, its read tables to
-- cqrs_reader) come after this, in its own privileges file (the shop's: sql/privileges.sql).
REVOKE ALL ON SCHEMA cqrs FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs FROM PUBLIC;

-- cqrs_writer: the receipt type that commands return (USAGE, no function, no table).
GRANT USAGE ON SCHEMA cqrs TO cqrs_writer;

-- cqrs_reader: read-your-writes.
GRANT USAGE ON SCHEMA cqrs TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.caught_up(bigint, text) TO cqrs_reader;

-- cqrs_listener: what the daemon calls, and the list of projections it runs. A python
-- projection's handler writes its tables as this role: grant those with the projection.
-- prune_receipts, prune: an operator's cron job may run as the daemon's role, and the
-- daemon keeps the outbox's partitions ahead (extend_outbox) and may prune on a schedule.
GRANT USAGE ON SCHEMA cqrs TO cqrs_listener;
GRANT SELECT ON cqrs.projections, cqrs.parked TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.run_projection(text, integer, interval),
    cqrs.run_projections(text[], integer, text, interval, interval),
    cqrs.claim_batch(text, integer, boolean, boolean),
    cqrs.batch_events(text, bigint, bigint),
    cqrs.complete_batch(text, bigint, bigint, integer, boolean),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.adopt_cluster(),
    cqrs._xids_moved(),
    cqrs.rebuild_status(),
    cqrs.take_mark(text),
    cqrs.mark_usable(text, interval, interval),
    cqrs.projection_status(),
    cqrs.projection_failed(text, bigint, text, text, integer),
    cqrs.claim_parked(text),
    cqrs.apply_parked(text, bigint),
    cqrs.parked_failed(text, bigint, text, text),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.work_pending(text[]),
    cqrs.look_for_work(text[], text, bigint, interval),
    cqrs.last_position(),
    cqrs.caught_up(bigint, text),
    cqrs.prune_receipts(interval, integer),
    cqrs.extend_outbox(bigint, integer),
    cqrs.prune(interval, boolean),
    cqrs.outbox_status(),
    cqrs.subscription_status()
TO cqrs_listener;

-- cqrs_consumer: its subscriptions, and nothing else (the relay runs as it).
GRANT USAGE ON SCHEMA cqrs TO cqrs_consumer;
GRANT EXECUTE ON FUNCTION
    cqrs.create_subscription(text, text[], text[], boolean),
    cqrs.poll(text, integer, text),
    cqrs.ack(text, text),
    cqrs.drop_subscription(text)
TO cqrs_consumer;
