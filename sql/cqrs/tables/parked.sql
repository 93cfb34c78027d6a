-- Events a projection set aside (outcome 'parked': its policy is 'park' and the event
-- failed after every retry) or an operator skipped (outcome 'skipped', cqrs.skip_event):
-- the checkpoint went past them, and neither is applied. `cqrs-pg retry` asks the daemon
-- to apply the parked ones again (retry true); one that applies leaves this table.
CREATE TABLE cqrs.parked (
    projection  text NOT NULL REFERENCES cqrs.projections (name) ON DELETE CASCADE ON UPDATE CASCADE,
    position    bigint NOT NULL,
    event_type  text NOT NULL,
    outcome     text NOT NULL,
    error       text,
    sqlstate    text,
    attempts    integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    retry       boolean NOT NULL DEFAULT false,
    PRIMARY KEY (projection, position),
    CONSTRAINT parked_outcome CHECK (outcome IN ('parked', 'skipped')),
    CONSTRAINT parked_retry CHECK (outcome = 'parked' OR NOT retry)
);
