-- Running daemons. A row with sleeping = true asks the outbox trigger to ring the doorbell
-- (NOTIFY); while no daemon sleeps, commands skip NOTIFY and its commit-time lock.
-- expires_at lets a killed daemon's row stop costing commands anything.
CREATE TABLE cqrs.listeners (
    listener_id text PRIMARY KEY,
    pid         integer NOT NULL,
    sleeping    boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    expires_at  timestamptz NOT NULL
);
