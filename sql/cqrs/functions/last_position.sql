-- The last position the outbox's sequence handed out (0: none yet), whether or not its
-- transaction has committed: the daemon's cheapest look for new events between its looks
-- for work (cqrs.look_for_work's settled_position).
CREATE OR REPLACE FUNCTION cqrs.last_position()
RETURNS bigint
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
$$;
