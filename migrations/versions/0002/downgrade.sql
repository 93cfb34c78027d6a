-- 0002 undone, first: drop what 0002 added; the DOWNGRADE_SOURCES after this restore what it changed.
-- Outbox capture: remember each captured table's arguments, drop its generated function
-- (and triggers); 0001's cqrs.tg_capture is restored and re-attached below.
CREATE TEMP TABLE cqrs_0002_captures AS
SELECT DISTINCT t.tgrelid::regclass AS tbl, t.tgfoid::regprocedure AS fn,
       string_to_array(encode(t.tgargs, 'escape'), '\000') AS args
  FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
 WHERE p.pronamespace = 'cqrs'::regnamespace AND p.proname LIKE '\_capture\_%' AND NOT t.tgisinternal;
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT DISTINCT fn FROM cqrs_0002_captures LOOP
        EXECUTE format('DROP FUNCTION %s CASCADE', f);
    END LOOP;
END
$$;
DROP FUNCTION cqrs._ring_doorbell();
DROP FUNCTION cqrs.rebuild_claim(text, integer, boolean),
              cqrs.rebuild_events(text, xid8, bigint, xid8, bigint),
              cqrs.rebuild_complete(text, xid8, bigint, bigint, xid8);
DROP FUNCTION cqrs.batch_unordered(xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.prune_receipts(interval, integer);
DROP INDEX cqrs.commands_created_at_idx;
-- Read-model sums back to bigint (0001); product_sales is restored below.
DROP MATERIALIZED VIEW shop_read.product_sales;
ALTER TABLE shop_read.customer_stats ALTER COLUMN lifetime_value_cents TYPE bigint;
