-- A rebuild in progress: the shadow schema its new tables grow in, and its own checkpoint
-- (the columns of cqrs.projections of the same names mean the same).
CREATE TABLE cqrs.rebuilds (
    projection     text PRIMARY KEY REFERENCES cqrs.projections (name) ON DELETE CASCADE,
    shadow_schema  name NOT NULL,
    last_position  bigint NOT NULL DEFAULT 0,
    applied_events bigint NOT NULL DEFAULT 0,
    final_position bigint NOT NULL DEFAULT 0,
    mark_xmax      xid8,
    mark_position  bigint,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- the session that began it: running while that backend is (cqrs.rebuild_status)
    pid            integer,
    backend_start  timestamptz,
    -- a rebuild from state (cqrs.rebuild_load): the snapshot the write model's state was
    -- read in; the events of the transactions it sees are in that state, and none after
    -- snapshot_position is
    snapshot          pg_snapshot,
    snapshot_position bigint
);
