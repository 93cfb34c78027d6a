-- The cqrs core: outbox, command receipts, projection checkpoints, wake-up doorbell.
CREATE SCHEMA cqrs;
