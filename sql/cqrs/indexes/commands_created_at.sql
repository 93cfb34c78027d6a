-- For cqrs.prune_receipts: the oldest receipts without a scan of them all.
CREATE INDEX commands_created_at_idx ON cqrs.commands (created_at);
