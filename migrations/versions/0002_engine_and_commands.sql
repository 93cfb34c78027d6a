-- migrations/versions/0002/before.sql
-- 0002, first: drops and ALTERs that the new definitions below need.
SELECT 1;

-- migrations/versions/0002/after.sql
-- 0002, last: grants and data changes after the new definitions.
SELECT 1;
