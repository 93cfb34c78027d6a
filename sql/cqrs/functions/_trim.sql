-- A text argument without leading and trailing spaces. Trims Unicode spaces by name:
-- [[:space:]] depends on the server's locale (under C.UTF-8 it misses U+00A0), so a
-- "name" of no-break spaces would pass. No SET clause, so the planner inlines it.
CREATE OR REPLACE FUNCTION cqrs._trim(value text)
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT pg_catalog.regexp_replace(
        value,
        '^[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+'
        '|[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+$',
        '', 'g');
$$;
