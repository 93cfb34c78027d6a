-- Keeps the outbox's partitions ahead of its sequence: at least `ahead` empty partitions of
-- partition_size positions beyond the one that holds the last position handed out.
-- Returns the partitions it added. A new partition is attached (a SHARE UPDATE EXCLUSIVE
-- lock on the outbox, which writers do not feel), never created as a partition (an
-- ACCESS EXCLUSIVE one). Events that went to the default partition because no partition
-- was ready move into the first one added, so that every event lies in a range partition
-- that cqrs.prune can drop. The daemon calls this once a minute, and cqrs.prune does.
CREATE OR REPLACE FUNCTION cqrs.extend_outbox(partition_size bigint DEFAULT 1000000, ahead integer DEFAULT 2)
RETURNS SETOF regclass
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    last bigint := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    first_ bigint;
    end_ bigint;
    name_ text;
    overflow boolean;
BEGIN
    PERFORM cqrs._require_range('partition_size', partition_size, 1000, 1000000000);
    PERFORM cqrs._require_range('ahead', ahead, 1, 100);
    SELECT max(b.end_position) INTO end_
      FROM cqrs._outbox_partitions() p CROSS JOIN LATERAL cqrs._partition_bounds(p.partition) b;
    overflow := EXISTS (SELECT 1 FROM cqrs.outbox_default);
    IF overflow THEN
        -- Writers routed there wait for this lock; the partition that takes its events in
        -- ends far enough beyond the last position that none can still be on its way past it.
        LOCK TABLE cqrs.outbox_default IN ACCESS EXCLUSIVE MODE;
        last := coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0);
    END IF;
    WHILE overflow OR end_ IS NULL OR end_ <= last + ahead * partition_size LOOP
        first_ := end_;
        end_ := coalesce(first_, 0) + partition_size;
        IF overflow THEN
            end_ := greatest(end_, last + 10000);
        END IF;
        name_ := 'outbox_' || coalesce(first_, 0);
        EXECUTE format('CREATE TABLE cqrs.%I (LIKE cqrs.outbox)', name_);
        IF overflow THEN
            EXECUTE format('INSERT INTO cqrs.%I SELECT * FROM cqrs.outbox_default', name_);
            DELETE FROM cqrs.outbox_default;
            overflow := false;
        END IF;
        EXECUTE format('ALTER TABLE cqrs.outbox ATTACH PARTITION cqrs.%I FOR VALUES FROM (%s) TO (%s)',
                       name_, coalesce(first_::text, 'MINVALUE'), end_);
        RETURN NEXT format('cqrs.%I', name_)::regclass;
    END LOOP;
END
$$;
