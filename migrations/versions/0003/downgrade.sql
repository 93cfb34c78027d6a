-- 0003 undone, first: the functions that call cqrs._fence are restored below (as 0002 or
-- 0001 froze them), then 0003's own objects go (downgrade_after.sql).
SELECT 1;
