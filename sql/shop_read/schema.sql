-- The read model: denormalized tables kept by the daemon, and a materialized view it
-- refreshes. Readable by cqrs_reader, typically on a streaming replica.
CREATE SCHEMA shop_read;
