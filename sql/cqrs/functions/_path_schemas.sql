-- The schemas a projection's search_path names, in order, as PostgreSQL reads one: a
-- comma-separated list of names, each plain (folded to lower case) or double-quoted;
-- $user, which names no schema of the projection's own, left out. CQ001 for anything
-- else (an empty name, stray quotes).
CREATE OR REPLACE FUNCTION cqrs._path_schemas(projection text, search_path text)
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    item text;
    schemas text[] := '{}'::text[];
BEGIN
    FOREACH item IN ARRAY coalesce(string_to_array(search_path, ','), '{}'::text[]) LOOP
        item := btrim(item, E' \t\n\r');
        IF item IN ('$user', '"$user"') THEN
            CONTINUE;
        ELSIF item ~ '^"([^"]|"")+"$' THEN
            schemas := schemas || replace(substr(item, 2, length(item) - 2), '""', '"');
        ELSIF item ~ '^[^\s",]+$' THEN
            schemas := schemas || lower(item);
        ELSE
            PERFORM cqrs._fail('CQ001', format(
                'projection %L: search_path must be a list of schemas separated by commas, not %s',
                projection, cqrs._shown(search_path)));
        END IF;
    END LOOP;
    RETURN schemas;
END
$$;
