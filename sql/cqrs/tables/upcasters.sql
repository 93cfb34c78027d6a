-- How an event's payload of one shape becomes the next (cqrs.register_upcaster): for
-- event_type, function(payload jsonb) RETURNS jsonb turns a payload of from_version into
-- one of from_version + 1. Readers (cqrs.batch) apply them in turn, so every projection,
-- handler and rebuild sees each event in its type's newest shape.
CREATE TABLE cqrs.upcasters (
    event_type   text NOT NULL,
    from_version integer NOT NULL,
    function     text NOT NULL,
    PRIMARY KEY (event_type, from_version),
    CONSTRAINT upcasters_from_version CHECK (from_version >= 1)
);
