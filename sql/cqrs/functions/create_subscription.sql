-- A new subscription: a consumer's place in the outbox, read with cqrs.poll and moved
-- with cqrs.ack. event_types, aggregate_types: only events of these (NULL: all). It
-- starts at the final position (cqrs._read_limit): every event committed after this call
-- is handed out (when other transactions run now, so may a few committed just before);
-- from_beginning: at the oldest event the outbox still holds (cqrs.prune drops history no
-- reader needs). CQ001 for a bad name or filter, CQ003 when the name is taken.
CREATE OR REPLACE FUNCTION cqrs.create_subscription(
    name text, event_types text[] DEFAULT NULL, aggregate_types text[] DEFAULT NULL,
    from_beginning boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lim record;
    start bigint;
BEGIN
    -- stored trimmed, as they are checked: a type with spaces around it would match nothing
    name := cqrs._require_text('name', name, 200);
    event_types := cqrs._require_types('event_types', event_types);
    aggregate_types := cqrs._require_types('aggregate_types', aggregate_types);
    IF from_beginning THEN
        -- the oldest history left, with no prune running (cqrs.pruning)
        PERFORM 1 FROM cqrs.pruning FOR SHARE;
    END IF;
    SELECT * INTO lim FROM cqrs._read_limit();
    start := CASE WHEN from_beginning THEN greatest(coalesce(cqrs._history_start() - 1, 0), 0)
                  ELSE lim.final_position END;
    INSERT INTO cqrs.subscriptions (name, event_types, aggregate_types, last_position, delivered_position, final_position)
    VALUES (name, event_types, aggregate_types, start, start, lim.final_position)
    ON CONFLICT ON CONSTRAINT subscriptions_pkey DO NOTHING;
    IF NOT FOUND THEN
        PERFORM cqrs._fail('CQ003', format(
            'subscription %L already exists: choose another name, or drop it first with cqrs.drop_subscription', name));
    END IF;
END
$$;
