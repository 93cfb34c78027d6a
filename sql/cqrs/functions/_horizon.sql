-- An xid below which every transaction has all its events at or below after_position,
-- for a reader that has applied everything up to there: the fence, or the oldest
-- transaction with an event after it. NULL when more than 5,000 events may lie after it
-- (a catch-up: not worth reading now; the caller keeps the horizon it has). Cheap by
-- default: more than 5,000 positions handed out after it are taken for that many events;
-- with thorough, the events themselves are counted (positions of rolled-back
-- transactions take no event).
-- PL/pgSQL, one generic plan: the primary key's walk from after_position over at most
-- 5,001 events, planned once per session (a plan of the bare bound was made again for
-- every batch: 0.4 ms at 3M events).
CREATE OR REPLACE FUNCTION cqrs._horizon(after_position bigint, fence xid8, thorough boolean DEFAULT false)
RETURNS xid8
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    IF thorough OR coalesce(pg_sequence_last_value('cqrs.outbox_position_seq'::regclass), 0) - after_position <= 5000 THEN
        RETURN (SELECT CASE WHEN count(*) <= 5000 THEN least(fence, min(x.tx_id)) END
                  FROM (SELECT o.tx_id FROM cqrs.outbox o WHERE o.position > after_position
                         ORDER BY o.position LIMIT 5001) x);
    END IF;
    RETURN NULL;
END
$$;
