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
