-- migrations/versions/0002/downgrade.sql
-- 0002 undone, first: drop what 0002 added; the DOWNGRADE_SOURCES after this restore what it changed.
SELECT 1;
