-- What is wrong with a text argument, as a CQ001 message; NULL when nothing is. Wrong:
-- null, blank (once trimmed by cqrs._trim), longer than max_length as given (spaces
-- around it included: a command keeps its arguments as given in cqrs.commands, so no
-- padding may carry more than the bound there) or holding a control character. The value
-- is shown on one line (cqrs._shown). cqrs._require_text raises it; a command raises it itself, so that the
-- error's CONTEXT names only the command.
CREATE OR REPLACE FUNCTION cqrs._text_problem(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := cqrs._trim(value);
    bad integer;
BEGIN
    IF trimmed IS NULL THEN
        RETURN format('%s must not be null', argument);
    ELSIF trimmed = '' THEN
        RETURN format('%s must not be blank, got %s', argument, cqrs._shown(left(value, 40)));
    ELSIF length(value) > max_length THEN
        RETURN format('%s must be at most %s characters, spaces around it included, got %s: %s',
                      argument, max_length, length(value), cqrs._shown(left(trimmed, 40) || '...'));
    END IF;
    bad := regexp_instr(trimmed, '[\u0001-\u001f\u007f-\u009f]');
    IF bad > 0 THEN
        RETURN format('%s must not contain control characters, got U+%s at position %s: %s',
                      argument, lpad(upper(to_hex(ascii(substr(trimmed, bad, 1)))), 4, '0'),
                      bad, cqrs._shown(left(trimmed, 40)));
    END IF;
    RETURN NULL;
END
$$;
