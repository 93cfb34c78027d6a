-- 0002, last: grants and data changes after the new definitions.
SELECT 1;
