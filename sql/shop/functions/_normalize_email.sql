-- Trims and lower-cases an email address; CQ001 unless it looks like local@domain.tld.
-- Lower-cased with ICU's root collation, so the result does not depend on the database's
-- locale (lower() under locale C leaves non-ASCII letters alone).
CREATE OR REPLACE FUNCTION shop._normalize_email(email text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    normalized text := lower(cqrs._require_text('email', email, 320) COLLATE "und-x-icu");
BEGIN
    IF normalized !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
        PERFORM cqrs._fail('CQ001', format('email is not a valid address: %L', email));
    END IF;
    RETURN normalized;
END
$$;
