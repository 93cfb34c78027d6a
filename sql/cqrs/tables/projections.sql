-- One row per projection: its checkpoint, advanced in the same transaction as its
-- read-model writes, so the checkpoint replicates together with what it describes.
-- Functions and relations are kept by schema-qualified name (text), not as regproc or
-- regclass: a logical restore loads this table before it creates every view it could
-- name, and pg_upgrade refuses a table with a regproc column.
CREATE TABLE cqrs.projections (
    name             text PRIMARY KEY,
    kind             text NOT NULL,
    apply_function   text,
    matview          text,
    -- matview: refresh only for these; python: the handler sees only these (NULL: all)
    event_types      text[],
    -- sql: the schemas its apply function finds its tables in, and the tables it owns
    -- (what cqrs-pg rebuild builds anew and swaps in); python: the schemas its handler's
    -- unqualified table names resolve in, and the tables it writes (what a rebuild copies
    -- and swaps in, as for sql)
    search_path      text,
    tables           text[],
    -- the checkpoint: every event at or below last_position is applied, and no other
    last_position    bigint NOT NULL DEFAULT 0,
    applied_events   bigint NOT NULL DEFAULT 0,
    -- every transaction with an xid below horizon is wholly applied (cqrs.caught_up), as
    -- found for the checkpoint at horizon_position (cqrs._horizon may put it off)
    horizon          xid8 NOT NULL DEFAULT '0',
    horizon_position bigint NOT NULL DEFAULT 0,
    -- what this reader learnt of how far reading may go (cqrs._read_limit): every position
    -- up to final_position is final; the mark says every position up to mark_position will
    -- be, once no transaction below mark_xmax runs
    final_position   bigint NOT NULL DEFAULT 0,
    mark_xmax        xid8,
    mark_position    bigint,
    refreshed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- what the daemon does with an event that still fails after its retries: 'halt' (stay
    -- at it until an operator retries or skips it) or 'park' (set it aside in cqrs.parked
    -- and go on)
    on_error         text NOT NULL DEFAULT 'halt',
    -- 'halted': the event at failed_position, the first after the checkpoint, failed
    -- failed_attempts times, the last with failed_error (failed_sqlstate: NULL for a python
    -- handler's exception); applying past it, cqrs.skip_event or cqrs.retry_projection
    -- makes it 'running' again
    state            text NOT NULL DEFAULT 'running',
    failed_position  bigint,
    failed_error     text,
    failed_sqlstate  text,
    failed_attempts  integer,
    failed_at        timestamptz,
    -- sql and python: a function () RETURNS void that fills the projection's tables (found
    -- through search_path, as the apply function finds them) from the write model's
    -- current state, what its events add up to; cqrs-pg rebuild loads the read model
    -- from it and cqrs-pg verify compares with it (NULL: neither can)
    state_function   text,
    CONSTRAINT projections_kind CHECK (kind IN ('sql', 'matview', 'python')),
    CONSTRAINT projections_sql_has_function CHECK (kind <> 'sql' OR (apply_function IS NOT NULL AND search_path IS NOT NULL AND tables IS NOT NULL)),
    -- python: a handler registered by name in the daemon (cqrs_pg.projections.register)
    CONSTRAINT projections_python_has_search_path CHECK (kind <> 'python' OR search_path IS NOT NULL),
    CONSTRAINT projections_matview_has_view CHECK (kind <> 'matview' OR matview IS NOT NULL),
    CONSTRAINT projections_on_error CHECK (on_error IN ('halt', 'park')),
    -- a view's refresh covers every event: none can be set aside
    CONSTRAINT projections_matview_halts CHECK (kind <> 'matview' OR on_error = 'halt'),
    CONSTRAINT projections_state CHECK (state IN ('running', 'halted')),
    CONSTRAINT projections_halted_at CHECK ((state = 'halted') = (failed_position IS NOT NULL))
);
