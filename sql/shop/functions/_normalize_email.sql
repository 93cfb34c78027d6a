-- An email address trimmed and lower-cased; check it with shop._email_problem first.
-- Lower-cased with ICU's root collation, so the result does not depend on the database's
-- locale (lower() under locale C leaves non-ASCII letters alone).
CREATE OR REPLACE FUNCTION shop._normalize_email(email text)
RETURNS text
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT pg_catalog.lower(cqrs._trim(email) COLLATE pg_catalog."und-x-icu");
$$;
