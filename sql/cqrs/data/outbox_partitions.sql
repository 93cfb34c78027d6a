-- The outbox's first partitions: from the first position on, and two ahead of it.
SELECT cqrs.extend_outbox();
