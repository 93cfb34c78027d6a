-- Running daemons. A row with sleeping = true asks the outbox trigger to ring the doorbell
-- (NOTIFY); while no daemon sleeps, commands skip NOTIFY and its commit-time lock.
-- expires_at lets a killed daemon's row stop costing commands anything. final_position,
-- mark_xmax and mark_position: what the daemon found of how far reading may go, for its
-- next round (cqrs.take_mark, cqrs._read_limit).
CREATE TABLE cqrs.listeners (
    listener_id    text PRIMARY KEY,
    pid            integer NOT NULL,
    sleeping       boolean NOT NULL DEFAULT false,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at     timestamptz NOT NULL,
    final_position bigint NOT NULL DEFAULT 0,
    mark_xmax      xid8,
    mark_position  bigint
);
