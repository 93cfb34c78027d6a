-- A subscription's filter argument (argument: its name) as stored: NULL (every type), or
-- its types trimmed, each checked as cqrs._require_text checks a text; CQ001 for an empty
-- list or a bad type, naming it.
CREATE OR REPLACE FUNCTION cqrs._require_types(argument text, types text[])
RETURNS text[]
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF types IS NULL THEN
        RETURN NULL;
    ELSIF cardinality(types) = 0 THEN
        PERFORM cqrs._fail('CQ001', format('%s must list at least one type, or be NULL for all', argument));
    END IF;
    RETURN ARRAY(SELECT cqrs._require_text(format('%s[%s]', argument, i), types[i], 200)
                   FROM generate_subscripts(types, 1) AS i ORDER BY i);
END
$$;
