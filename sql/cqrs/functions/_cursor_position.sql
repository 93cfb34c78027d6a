-- The position a cursor (as cqrs.poll hands it out) stands for; CQ001 for anything else.
CREATE OR REPLACE FUNCTION cqrs._cursor_position(cursor text)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF cursor IS NULL OR cursor !~ '^[0-9]{1,18}$' THEN
        PERFORM cqrs._fail('CQ001', format(
            'cursor must be one that cqrs.poll returned, got %s', coalesce(quote_literal(left(cursor, 40)), 'NULL')));
    END IF;
    RETURN cursor::bigint;
END
$$;
