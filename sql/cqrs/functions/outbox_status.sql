-- The outbox's history, for `cqrs-pg status`: history_start (NULL: it holds every event;
-- else the first position left after cqrs.prune), its range partitions and their size on
-- disk, how many positions are ready beyond the last one handed out (cqrs.extend_outbox
-- keeps two partitions' worth), and the events in the default partition, waiting for the
-- next extend_outbox to move them (it keeps that partition empty).
CREATE OR REPLACE FUNCTION cqrs.outbox_status(
    OUT history_start bigint, OUT partitions integer, OUT bytes bigint, OUT ready_ahead bigint,
    OUT overflow_events bigint)
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    history_start := cqrs._history_start();
    SELECT count(*)::integer, coalesce(sum(pg_total_relation_size(p.partition)), 0)::bigint,
           max(b.end_position) - 1 - coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0)
      INTO partitions, bytes, ready_ahead
      FROM cqrs._outbox_partitions() p CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
    bytes := bytes + pg_total_relation_size('cqrs.outbox_default'::regclass);
    SELECT count(*) INTO overflow_events FROM cqrs.outbox_default;
END
$$;
