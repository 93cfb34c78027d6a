-- Group roles (NOLOGIN); deployers grant them to login users. Roles are cluster-wide, so
-- an install into a second database of the same cluster finds them already there.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['cqrs_writer', 'cqrs_reader', 'cqrs_listener', 'cqrs_consumer'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
