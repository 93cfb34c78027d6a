-- Whether xid x is a materialized view's refresh that the fence leaves out: the xmax of a
-- locked cqrs.refreshing row (cqrs._exempt_from_fence). The one home of that rule, for
-- cqrs._fence and cqrs.fence_blockers; only meaningful for an xid still in progress.
-- No SET clause, so the planner inlines it into its callers (which pin search_path); the
-- operator is qualified all the same.
CREATE OR REPLACE FUNCTION cqrs._left_out_of_fence(x xid)
RETURNS boolean
LANGUAGE sql
STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM cqrs.refreshing r WHERE r.xmax OPERATOR(pg_catalog.=) x);
$$;
