-- 0004, first. Readers read the outbox in position order (each aggregate's version order)
-- up to the final position, instead of in (tx_id, position) order below the fence. Each
-- checkpoint (last_tx, last_position) becomes a position: just before the first event it
-- had not applied; the events it had applied after that one stay applied (ahead), so
-- none is applied twice or skipped. For that every event must be final: no transaction
-- may be adding events meanwhile, which the lock below makes sure of (it waits for those
-- that are, and holds new ones back until this migration commits).
LOCK TABLE cqrs.outbox IN SHARE MODE;

ALTER TABLE cqrs.projections
    ADD COLUMN ahead bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint,
    ADD COLUMN horizon_position bigint NOT NULL DEFAULT 0;
ALTER TABLE cqrs.listeners
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint;
ALTER TABLE cqrs.rebuilds
    ADD COLUMN ahead bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN final_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN mark_xmax xid8,
    ADD COLUMN mark_position bigint;

CREATE TEMP TABLE cqrs_0004_checkpoints ON COMMIT DROP AS
SELECT c.kind, c.name, x.cut,
       ARRAY(SELECT o.position FROM cqrs.outbox o
              WHERE o.position > x.cut AND (o.tx_id, o.position) <= (c.last_tx, c.last_position)
              ORDER BY o.position) AS ahead
  FROM (SELECT 'projection' AS kind, p.name, p.last_tx, p.last_position FROM cqrs.projections p
        UNION ALL
        SELECT 'rebuild', r.projection, r.last_tx, r.last_position FROM cqrs.rebuilds r) c
 CROSS JOIN LATERAL (
       SELECT coalesce((SELECT min(o.position) - 1 FROM cqrs.outbox o
                         WHERE (o.tx_id, o.position) > (c.last_tx, c.last_position)),
                       (SELECT max(o.position) FROM cqrs.outbox o), 0) AS cut) x;

UPDATE cqrs.projections p
   SET last_position = k.cut, ahead = k.ahead,
       final_position = coalesce((SELECT max(o.position) FROM cqrs.outbox o), 0)
  FROM cqrs_0004_checkpoints k
 WHERE k.kind = 'projection' AND k.name = p.name;
UPDATE cqrs.rebuilds r
   SET last_position = k.cut, ahead = k.ahead,
       final_position = coalesce((SELECT max(o.position) FROM cqrs.outbox o), 0)
  FROM cqrs_0004_checkpoints k
 WHERE k.kind = 'rebuild' AND k.name = r.projection;

ALTER TABLE cqrs.projections DROP COLUMN last_tx;
ALTER TABLE cqrs.rebuilds DROP COLUMN last_tx;
-- Nothing reads in (tx_id, position) order any more.
DROP INDEX cqrs.outbox_tx_id_position;
-- Their results change shape: created anew below.
DROP FUNCTION cqrs.claim_batch(text, integer);
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean);
DROP FUNCTION cqrs.projection_status();
