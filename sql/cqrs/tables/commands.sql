-- One row per command that committed: makes a retried command_id return its first receipt.
CREATE TABLE cqrs.commands (
    command_id   uuid PRIMARY KEY,
    command      text NOT NULL,
    arguments    jsonb NOT NULL,
    aggregate_id uuid,
    version      integer,
    token        bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);
