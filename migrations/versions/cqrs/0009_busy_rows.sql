-- cqrs_0009: the engine's busy rows (cqrs.projections, cqrs.listeners,
-- cqrs.subscriptions, cqrs.rebuilds), rewritten at every batch, round, poll or ack, have
-- heaps that grow far beyond their rows while old versions wait for the replicas' horizon:
-- the statements that read every row of them (cqrs._read_limit, cqrs.caught_up) and the
-- doorbell at every command get a way through an index. cqrs.caught_up for one projection
-- reads its row once.

-- sql/cqrs/indexes/listeners_sleeping.sql
-- For cqrs._ring_doorbell, at every command: whether some daemon sleeps, from an index that
-- holds only the sleeping rows (none while daemons are awake), never a read of the table,
-- whose heap grows with the marks the daemons write at every round.
CREATE INDEX listeners_sleeping_idx ON cqrs.listeners (expires_at) WHERE sleeping;

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
      -- IS NOT NULL (every row): a way through the primary key, for when a table's heap
      -- has grown far beyond its rows (sql/cqrs/DESIGN.md, the engine's busy rows)
      FROM (SELECT p.final_position, p.mark_xmax, p.mark_position FROM cqrs.projections p
             WHERE p.name IS NOT NULL
            UNION ALL
            SELECT b.final_position, b.mark_xmax, b.mark_position FROM cqrs.rebuilds b
             WHERE b.projection IS NOT NULL
            UNION ALL
            SELECT l.final_position, l.mark_xmax, l.mark_position FROM cqrs.listeners l
             WHERE l.listener_id IS NOT NULL
            UNION ALL
            SELECT s.final_position, s.mark_xmax, s.mark_position FROM cqrs.subscriptions s
             WHERE s.name IS NOT NULL) r;
    final_position := greatest(final_position, now_final, 0);
END
$$;

-- sql/cqrs/functions/caught_up.sql
-- True once the projection (NULL: every projection) has applied every event of the
-- transaction that returned token. Reads only cqrs.projections, which replicates with
-- the read tables, so it answers correctly on a streaming replica. A horizon at or above
-- this cluster's next xid is another cluster's (a logical restore not yet adopted,
-- cqrs.adopt_cluster): it proves nothing, so the answer is false until then.
CREATE OR REPLACE FUNCTION cqrs.caught_up(token bigint, projection text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    one cqrs.projections;
BEGIN
    PERFORM cqrs._require_range('token', token, 0);
    IF projection IS NOT NULL THEN
        one := cqrs._projection(projection);
        RETURN NOT (one.horizon <= token::text::xid8 OR one.horizon >= pg_snapshot_xmax(pg_current_snapshot()));
    END IF;
    RETURN NOT EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name IS NOT NULL  -- a way through the primary key
           AND (p.horizon <= token::text::xid8 OR p.horizon >= pg_snapshot_xmax(pg_current_snapshot())));
END
$$;

-- sql/cqrs/version.sql
-- The engine's version: its newest revision of migrations/versions/cqrs/, which every
-- revision sets. cqrs_pg reads it (cqrs_pg.core.installed_version) and refuses to run
-- against an engine older or newer than its own, naming both.
COMMENT ON SCHEMA cqrs IS 'cqrs_pg engine 0009';
