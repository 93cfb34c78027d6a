-- 0004 undone, first. Checkpoints go back to (last_tx, last_position) order: the last event
-- before the first one not applied, in (tx_id, position) order. That describes what a
-- reader applied only when no event it applied comes after one it has not, in that
-- order; otherwise the downgrade is refused (stop the commands and let the daemon apply
-- every event first), since the earlier engine would apply those events again. The lock
-- makes every event final meanwhile, as on the way up.
LOCK TABLE cqrs.outbox IN SHARE MODE;
CREATE INDEX outbox_tx_id_position ON cqrs.outbox (tx_id, position);

CREATE TEMP TABLE cqrs_0004_checkpoints ON COMMIT DROP AS
SELECT c.kind, c.name, coalesce(x.last_tx, '0') AS last_tx, coalesce(x.last_position, 0) AS last_position,
       (SELECT count(*) FROM cqrs.outbox o
         WHERE (o.position <= c.last_position OR o.position = ANY (c.ahead))
           AND (o.tx_id, o.position) > (coalesce(x.last_tx, '0'), coalesce(x.last_position, 0))) AS beyond
  FROM (SELECT 'projection' AS kind, p.name, p.last_position, p.ahead FROM cqrs.projections p
        UNION ALL
        SELECT 'rebuild', r.projection, r.last_position, r.ahead FROM cqrs.rebuilds r) c
  LEFT JOIN LATERAL (
       SELECT o.tx_id, o.position FROM cqrs.outbox o
        WHERE o.position > c.last_position AND o.position <> ALL (c.ahead)
        ORDER BY o.tx_id, o.position LIMIT 1) u ON true
  LEFT JOIN LATERAL (
       SELECT o.tx_id AS last_tx, o.position AS last_position FROM cqrs.outbox o
        WHERE u.tx_id IS NULL OR (o.tx_id, o.position) < (u.tx_id, u.position)
        ORDER BY o.tx_id DESC, o.position DESC LIMIT 1) x ON true;
DO $$
DECLARE
    k record;
BEGIN
    SELECT * INTO k FROM cqrs_0004_checkpoints WHERE beyond > 0 ORDER BY kind, name LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ003', MESSAGE = format(
            'cannot downgrade below 0004 now: %s %L has applied %s events after one it has not applied, in the '
            'earlier engine''s (tx_id, position) order, and would apply them again; stop the commands, let '
            'cqrs-pg listen apply every event (and finish or drop any rebuild), then downgrade', k.kind, k.name, k.beyond);
    END IF;
END
$$;

-- The tables back in their earlier shape (a column back in its place), and what depends
-- on their row types.
DROP FUNCTION cqrs._projection(text);
DROP FUNCTION cqrs.claim_batch(text, integer);
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean);
DROP FUNCTION cqrs.projection_status();
ALTER TABLE cqrs.rebuilds RENAME TO rebuilds_0004;
ALTER TABLE cqrs.rebuilds_0004 RENAME CONSTRAINT rebuilds_pkey TO rebuilds_0004_pkey;
ALTER TABLE cqrs.rebuilds_0004 RENAME CONSTRAINT rebuilds_projection_fkey TO rebuilds_0004_projection_fkey;
ALTER TABLE cqrs.projections RENAME TO projections_0004;
ALTER TABLE cqrs.projections_0004 RENAME CONSTRAINT projections_pkey TO projections_0004_pkey;
CREATE TABLE cqrs.projections (
    name           text PRIMARY KEY,
    kind           text NOT NULL,
    apply_function regproc,
    matview        regclass,
    -- matview: refresh only for these; python: the handler sees only these (NULL: all)
    event_types    text[],
    -- sql: the schemas its apply function finds its tables in, and the tables it owns
    -- (what cqrs-pg rebuild builds anew and swaps in); python: the schemas its handler's
    -- unqualified table names resolve in, and the tables it writes (what a rebuild copies
    -- and swaps in, as for sql)
    search_path    text,
    tables         regclass[],
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    -- every transaction with an xid below horizon is wholly applied (cqrs.caught_up)
    horizon        xid8 NOT NULL DEFAULT '0',
    applied_events bigint NOT NULL DEFAULT 0,
    refreshed_at   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT projections_kind CHECK (kind IN ('sql', 'matview', 'python')),
    CONSTRAINT projections_sql_has_function CHECK (kind <> 'sql' OR (apply_function IS NOT NULL AND search_path IS NOT NULL AND tables IS NOT NULL)),
    -- python: a handler registered by name in the daemon (cqrs_pg.projections.register)
    CONSTRAINT projections_python_has_search_path CHECK (kind <> 'python' OR search_path IS NOT NULL),
    CONSTRAINT projections_matview_has_view CHECK (kind <> 'matview' OR matview IS NOT NULL)
);
CREATE TABLE cqrs.rebuilds (
    projection     text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE,
    shadow_schema  name NOT NULL,
    last_tx        xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    applied_events bigint NOT NULL DEFAULT 0,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO cqrs.projections (name, kind, apply_function, matview, event_types, search_path, tables, last_tx,
                              last_position, horizon, applied_events, refreshed_at, updated_at)
SELECT p.name, p.kind, p.apply_function, p.matview, p.event_types, p.search_path, p.tables, k.last_tx,
       k.last_position, p.horizon, p.applied_events, p.refreshed_at, p.updated_at
  FROM cqrs.projections_0004 p
  JOIN cqrs_0004_checkpoints k ON k.kind = 'projection' AND k.name = p.name;
INSERT INTO cqrs.rebuilds (projection, shadow_schema, last_tx, last_position, applied_events, started_at)
SELECT r.projection, r.shadow_schema, k.last_tx, k.last_position, r.applied_events, r.started_at
  FROM cqrs.rebuilds_0004 r
  JOIN cqrs_0004_checkpoints k ON k.kind = 'rebuild' AND k.name = r.projection;
ALTER TABLE cqrs.refreshing
    DROP CONSTRAINT refreshing_projection_fkey,
    ADD CONSTRAINT refreshing_projection_fkey FOREIGN KEY (projection) REFERENCES cqrs.projections (name) ON DELETE CASCADE;
DROP TABLE cqrs.rebuilds_0004, cqrs.projections_0004;

-- What 0004 added, or changed in signature (its earlier versions are restored below).
DROP FUNCTION cqrs.batch_events(text, bigint, bigint);
DROP FUNCTION cqrs.complete_batch(text, bigint, bigint, integer);
DROP FUNCTION cqrs.rebuild_events(text, bigint, bigint);
DROP FUNCTION cqrs.rebuild_complete(text, bigint, bigint);
DROP FUNCTION shop_proj.apply_order_summary(bigint, bigint);
DROP FUNCTION shop_proj.apply_customer_stats(bigint, bigint);
