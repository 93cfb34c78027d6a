-- How the shop's projections turn events into shop_read rows: their apply functions and
-- the private state they keep (latest versions seen), never exposed to readers.
CREATE SCHEMA shop_proj;
