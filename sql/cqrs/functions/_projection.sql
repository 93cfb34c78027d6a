-- A projection's row; CQ002 naming it when there is none.
CREATE OR REPLACE FUNCTION cqrs._projection(projection text)
RETURNS cqrs.projections
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p cqrs.projections;
BEGIN
    SELECT * INTO p FROM cqrs.projections c WHERE c.name = projection;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ002', format('projection %L does not exist', projection));
    END IF;
    RETURN p;
END
$$;
