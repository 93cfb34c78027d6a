-- True once the projection (NULL: every projection) has applied every event of the
-- transaction that returned token. Reads only cqrs.projections, which replicates with
-- the read tables, so it answers correctly on a streaming replica. A horizon at or above
-- this cluster's next xid is another cluster's (a logical restore not yet adopted,
-- cqrs.adopt_cluster): it proves nothing, so the answer is false until then.
CREATE OR REPLACE FUNCTION cqrs.caught_up(token bigint, projection text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    one cqrs.projections;
BEGIN
    PERFORM cqrs._require_range('token', token, 0);
    IF projection IS NOT NULL THEN
        one := cqrs._projection(projection);
        RETURN NOT (one.horizon <= token::text::xid8 OR one.horizon >= pg_snapshot_xmax(pg_current_snapshot()));
    END IF;
    RETURN NOT EXISTS (
        SELECT 1
          FROM cqrs.projections p
         WHERE p.name IS NOT NULL  -- a way through the primary key
           AND (p.horizon <= token::text::xid8 OR p.horizon >= pg_snapshot_xmax(pg_current_snapshot())));
END
$$;
