-- The append-only event log, written only by the capture triggers (cqrs.capture_changes) in the command's transaction.
-- position is taken at insert, not at commit, so readers never follow position alone:
-- they read in (tx_id, position) order below the xmin fence (see cqrs.run_projection).
CREATE TABLE cqrs.outbox (
    position          bigint GENERATED ALWAYS AS IDENTITY,
    tx_id             xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    event_type        text NOT NULL,
    aggregate_type    text NOT NULL,
    aggregate_id      uuid NOT NULL,
    aggregate_version integer NOT NULL,
    payload           jsonb NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    CONSTRAINT outbox_pkey PRIMARY KEY (position)
);

CREATE INDEX outbox_tx_id_position ON cqrs.outbox (tx_id, position);
