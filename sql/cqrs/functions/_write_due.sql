-- Whether projection p, with nothing to apply, still has something to write: a mark that
-- lets the events committed meanwhile be read soon (cqrs._needs_mark), or a horizon its
-- last batch put off (cqrs._horizon). The rest of cqrs._read_limit's answer is given.
-- An idle projection without either writes nothing.
-- PL/pgSQL: planned once per session (a SQL function with a SET clause is never inlined).
CREATE OR REPLACE FUNCTION cqrs._write_due(p cqrs.projections, final_position bigint, fence xid8,
                                           mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN cqrs._needs_mark(p.mark_xmax, final_position, fence, mark_position, pending_position)
        OR (p.horizon_position < p.last_position AND cqrs._horizon(p.last_position, fence, true) > p.horizon);
END
$$;
