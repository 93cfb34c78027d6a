-- Whether an event of event_type and aggregate_type passes a subscription's filter (its
-- event_types and aggregate_types; NULL: every type). No SET clause, so the planner
-- inlines it into each query: the filter stays one expression over the outbox's columns.
CREATE OR REPLACE FUNCTION cqrs._subscribed(event_types text[], aggregate_types text[],
                                            event_type text, aggregate_type text)
RETURNS boolean
LANGUAGE sql
IMMUTABLE
AS $$
    SELECT (event_types IS NULL OR event_type OPERATOR(pg_catalog.=) ANY (event_types))
       AND (aggregate_types IS NULL OR aggregate_type OPERATOR(pg_catalog.=) ANY (aggregate_types));
$$;
