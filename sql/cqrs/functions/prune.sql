-- Drops the outbox's oldest partitions while each holds only history that every reader
-- has passed and whose newest event is older than keep: every projection's checkpoint
-- (and a rebuild's) and every subscription's cursor is at or past its last position, no event in it is parked (a retry
-- reads it again), and it lies wholly below the last position handed out. Stops at the
-- first partition it must keep, so what remains is one unbroken stretch of history
-- (cqrs._history_start). Returns the partitions it dropped, or with dry_run those it
-- would drop, changing nothing (events: as the planner counts them, once analyzed). A partition is dropped whole (DROP TABLE: a brief ACCESS
-- EXCLUSIVE lock on the outbox, waited for at most lock_timeout), never emptied by DELETE.
-- It first takes cqrs.pruning's row, so that no reader being created from the oldest
-- history (not committed yet, so not among those it reads) loses it; CQ003 when one takes
-- longer than lock_timeout.
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
        BEGIN
            PERFORM 1 FROM cqrs.pruning FOR UPDATE;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM cqrs._fail('CQ003', format(
                'a projection or subscription is being created from the oldest history (transaction %s holds '
                'cqrs.pruning): prune again once it has ended', (SELECT p.xmax FROM cqrs.pruning p)));
        END;
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
