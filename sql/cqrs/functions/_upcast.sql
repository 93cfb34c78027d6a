-- An event's payload in its type's newest shape: the upcasters from its payload_version
-- on, applied in turn (cqrs.upcasters); cqrs._upcast_version is the version it reaches.
CREATE OR REPLACE FUNCTION cqrs._upcast(event_type text, payload_version integer, payload jsonb)
RETURNS jsonb
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fn text;
    v integer := payload_version;
BEGIN
    LOOP
        SELECT u.function INTO fn FROM cqrs.upcasters u WHERE u.event_type = _upcast.event_type AND u.from_version = v;
        EXIT WHEN NOT FOUND;
        EXECUTE format('SELECT %s($1)', fn::regproc) INTO payload USING payload;
        v := v + 1;
    END LOOP;
    RETURN payload;
END
$$;
