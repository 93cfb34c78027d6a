-- Outbox capture back to 0001: re-attach cqrs.tg_capture (restored above) to every table
-- that had a generated capture function, with the same arguments.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT DISTINCT tbl, args FROM cqrs_0002_captures ORDER BY 1 LOOP
        PERFORM cqrs.capture_changes(t.tbl, t.args[1], t.args[2], t.args[3], nullif(t.args[4], ''));
    END LOOP;
END
$$;
DROP TABLE cqrs_0002_captures;
REVOKE EXECUTE ON FUNCTION cqrs.tg_capture(), cqrs.capture_changes(regclass, text, text, name, name) FROM PUBLIC;
