-- What is wrong with an email argument, as a CQ001 message (cqrs._text_problem, or not
-- like local@domain.tld once normalized); NULL when nothing is.
CREATE OR REPLACE FUNCTION shop._email_problem(email text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := cqrs._text_problem('email', email, 320);
BEGIN
    IF problem IS NULL AND shop._normalize_email(email) !~ '^[^@[:space:]]+@[^@[:space:]]+\.[^@[:space:]]+$' THEN
        problem := format('email is not a valid address: %L', email);
    END IF;
    RETURN problem;
END
$$;
