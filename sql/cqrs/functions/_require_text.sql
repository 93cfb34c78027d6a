-- Trims a text argument; CQ001 when it is null, blank, longer than max_length or holds a
-- control character. Trims Unicode spaces by name: [[:space:]] depends on the server's
-- locale (under C.UTF-8 it misses U+00A0), so a "name" of no-break spaces would pass.
CREATE OR REPLACE FUNCTION cqrs._require_text(argument text, value text, max_length integer)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trimmed text := regexp_replace(
        value,
        '^[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+'
        '|[\s\u0085\u00a0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff]+$',
        '', 'g');
    bad integer;
BEGIN
    IF trimmed IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF trimmed = '' THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be blank, got %L', argument, left(value, 40)));
    ELSIF length(trimmed) > max_length THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s characters, got %s: %L',
                                           argument, max_length, length(trimmed), left(trimmed, 40) || '...'));
    END IF;
    bad := regexp_instr(trimmed, '[\u0001-\u001f\u007f-\u009f]');
    IF bad > 0 THEN
        PERFORM cqrs._fail('CQ001', format('%s must not contain control characters, got U+%s at position %s: %L',
                                           argument, lpad(upper(to_hex(ascii(substr(trimmed, bad, 1)))), 4, '0'),
                                           bad, left(trimmed, 40)));
    END IF;
    RETURN trimmed;
END
$$;
