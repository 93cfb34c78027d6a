-- Declares how payloads of event_type at from_version become the next version's, after a
-- migration changed the captured table's columns (and called cqrs.capture_changes with
-- the new payload_version): upcaster(payload jsonb) RETURNS jsonb. Every reader then gets
-- older events in the newest shape (cqrs.batch), so projections and rebuilds need to
-- know only that one. Register one for each event type of the table (created, updated,
-- deleted). CQ001: not such a function, or a version below 1; CQ003: one is registered
-- for that version already.
CREATE OR REPLACE FUNCTION cqrs.register_upcaster(event_type text, from_version integer, upcaster regproc)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    event_type := cqrs._require_text('event_type', event_type, 200);
    PERFORM cqrs._require_range('from_version', from_version, 1);
    IF upcaster IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_proc f
         WHERE f.oid = upcaster AND f.prorettype = 'jsonb'::regtype
           AND pg_catalog.oidvectortypes(f.proargtypes) = 'jsonb') THEN
        PERFORM cqrs._fail('CQ001', format('upcaster %s must take (payload jsonb) and return jsonb',
                                           coalesce(upcaster::text, 'null')));
    END IF;
    IF EXISTS (SELECT 1 FROM cqrs.upcasters u
                WHERE u.event_type = register_upcaster.event_type AND u.from_version = register_upcaster.from_version) THEN
        PERFORM cqrs._fail('CQ003', format('an upcaster of %s payloads from version %s is registered already',
                                           event_type, from_version));
    END IF;
    -- kept by name, schema-qualified (this function's search_path holds no other schema)
    INSERT INTO cqrs.upcasters (event_type, from_version, function)
    VALUES (event_type, from_version, upcaster::text);
END
$$;
