-- A value as an error message shows it, on one line: quoted as a literal, or, when it
-- holds a control character (a line break, a tab), as a JSON string, which writes those
-- as escapes (\n, \t, \u0001); the few JSON leaves as they are (U+007F to U+009F) as '?'.
CREATE OR REPLACE FUNCTION cqrs._shown(value text)
RETURNS text
LANGUAGE sql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN value ~ '[\u0001-\u001f\u007f-\u009f]'
                THEN regexp_replace(to_json(value)::text, '[\u007f-\u009f]', '?', 'g')
                ELSE quote_nullable(value) END;
$$;
