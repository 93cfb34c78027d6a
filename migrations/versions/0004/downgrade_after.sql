-- 0004 undone, last: the shop's projections run their earlier apply functions, and what
-- 0004 added goes.
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_order_summary'::regproc WHERE name = 'order_summary';
UPDATE cqrs.projections SET apply_function = 'shop_proj.apply_customer_stats'::regproc WHERE name = 'customer_stats';
DROP FUNCTION cqrs.take_mark(text);
DROP FUNCTION cqrs.mark_usable(text, interval);
ALTER TABLE cqrs.listeners DROP COLUMN final_position, DROP COLUMN mark_xmax, DROP COLUMN mark_position;
DROP FUNCTION cqrs._advance_checkpoint(text, boolean, bigint, bigint[], bigint, boolean, bigint, xid8, bigint);
DROP FUNCTION cqrs._apply_batch(regproc, text, bigint, bigint);
DROP FUNCTION cqrs.batch(bigint, bigint);
DROP FUNCTION cqrs.batch_unordered(bigint, bigint);
DROP FUNCTION cqrs._next_batch(bigint, bigint[], bigint, integer);
DROP FUNCTION cqrs._horizon(bigint, xid8, boolean);
DROP FUNCTION cqrs._needs_mark(xid8, bigint, xid8, bigint, bigint);
DROP FUNCTION cqrs._mark_replaceable(xid8, xid8, xid8);
DROP FUNCTION cqrs._read_limit();
DROP FUNCTION cqrs._xid_assigned(xid8);
DROP FUNCTION cqrs._fence(pg_snapshot);
