-- Trims a text argument (cqrs._trim); CQ001 when it is null, blank, longer than
-- max_length or holds a control character (cqrs._text_problem).
CREATE OR REPLACE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._text_problem(argument, value, max_length);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = problem;
    END IF;
    RETURN cqrs._trim(value);
END
$$;
