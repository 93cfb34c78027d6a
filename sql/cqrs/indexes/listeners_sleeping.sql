-- For cqrs._ring_doorbell, at every command: whether some daemon sleeps, from an index that
-- holds only the sleeping rows (none while daemons are awake), never a read of the table,
-- whose heap grows with the marks the daemons write at every round.
CREATE INDEX listeners_sleeping_idx ON cqrs.listeners (expires_at) WHERE sleeping;
