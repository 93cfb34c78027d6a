-- The version cqrs._upcast takes a payload of event_type at payload_version to.
CREATE OR REPLACE FUNCTION cqrs._upcast_version(event_type text, payload_version integer)
RETURNS integer
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE chain(v) AS (
        SELECT payload_version
        UNION ALL
        SELECT c.v + 1 FROM chain c JOIN cqrs.upcasters u ON u.event_type = _upcast_version.event_type AND u.from_version = c.v)
    SELECT max(v) FROM chain;
$$;
