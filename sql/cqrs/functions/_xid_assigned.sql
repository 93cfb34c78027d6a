-- Whether transaction id x has been handed out yet. pg_xact_status says "in the future"
-- (an error) for an id at or above the next one to be assigned; a snapshot's xmax is only
-- one more than the latest completed id, and transactions running with ids at or above it
-- are not in its list.
CREATE OR REPLACE FUNCTION cqrs._xid_assigned(x xid8)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_xact_status(x);
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;
