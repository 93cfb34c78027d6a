-- 0003 undone, last: nothing calls these any more.
DROP FUNCTION cqrs.work_pending(text[]);
DROP FUNCTION cqrs._exempt_from_fence(text);
DROP FUNCTION cqrs._fence();
DROP TABLE cqrs.refreshing;
