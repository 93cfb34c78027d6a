-- cqrs.work_pending's answer for a read limit already read (cqrs._read_limit's columns).
CREATE OR REPLACE FUNCTION cqrs._work_pending(projections text[], final_position bigint, fence xid8,
                                              mark_position bigint, pending_position bigint)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name = ANY (projections)
           AND p.kind <> 'matview'
           AND (EXISTS (SELECT 1
                          FROM cqrs.outbox o
                         WHERE o.position > p.last_position
                           AND o.position <= _work_pending.final_position)
                OR cqrs._needs_mark(p.mark_xmax, _work_pending.final_position, _work_pending.fence,
                                    _work_pending.mark_position, _work_pending.pending_position)));
END
$$;
