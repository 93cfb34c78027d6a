-- 0004, the core's last step: the functions of the (tx_id, position) order, which nothing
-- calls any more.
DROP FUNCTION cqrs._fence();
DROP FUNCTION cqrs._next_batch(xid8, bigint, xid8, integer);
DROP FUNCTION cqrs._advance_checkpoint(text, xid8, bigint, bigint, xid8, boolean, boolean);
DROP FUNCTION cqrs._apply_batch(regproc, text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.batch_events(text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.complete_batch(text, xid8, bigint, bigint, xid8, integer);
DROP FUNCTION cqrs.rebuild_events(text, xid8, bigint, xid8, bigint);
DROP FUNCTION cqrs.rebuild_complete(text, xid8, bigint, bigint, xid8);
