-- Outbox capture: every table that 0001's generic cqrs.tg_capture captured (by dynamic SQL
-- on every statement) gets a generated function of its own, attached with the same
-- arguments (the triggers' arguments); then tg_capture goes.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT DISTINCT tg.tgrelid::regclass AS tbl, string_to_array(encode(tg.tgargs, 'escape'), '\000') AS args
          FROM pg_trigger tg
         WHERE tg.tgfoid = 'cqrs.tg_capture()'::regprocedure AND NOT tg.tgisinternal
         ORDER BY 1
    LOOP
        PERFORM cqrs.capture_changes(t.tbl, t.args[1], t.args[2], t.args[3], nullif(t.args[4], ''));
    END LOOP;
END
$$;
DROP FUNCTION cqrs.tg_capture();
