-- The last position the outbox's sequence handed out (0: none yet), whether or not its
-- transaction has committed: the cheapest sign of new events since a settled position
-- (cqrs.look_for_work's settled_position). The daemon glances through cqrs.look_for_work
-- itself, which looks in full in the same call once the sequence moved.
CREATE OR REPLACE FUNCTION cqrs.last_position()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
$$;
