-- Statement-level outbox trigger: appends one event per changed row, in one INSERT, from
-- the transition table. Attached by cqrs.capture_changes(), whose arguments it receives:
-- TG_ARGV = aggregate_type, entity (event_type = entity.created|updated|deleted),
--           aggregate id column, aggregate version column ('' means version 1).
CREATE FUNCTION cqrs.tg_capture()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    metadata jsonb := jsonb_strip_nulls(jsonb_build_object(
        'command_id', nullif(current_setting('cqrs.command_id', true), ''),
        'command', nullif(current_setting('cqrs.command', true), '')));
BEGIN
    EXECUTE format(
        'INSERT INTO cqrs.outbox (event_type, aggregate_type, aggregate_id, aggregate_version, payload, metadata)
         SELECT $1, $2, r.%I, %s, to_jsonb(r), $3 FROM %I r',
        TG_ARGV[2],
        CASE WHEN TG_ARGV[3] = '' THEN '1' ELSE format('r.%I', TG_ARGV[3]) END,
        CASE TG_OP WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END)
    USING TG_ARGV[1] || '.' || CASE TG_OP WHEN 'INSERT' THEN 'created'
                                          WHEN 'UPDATE' THEN 'updated'
                                          ELSE 'deleted' END,
          TG_ARGV[0],
          metadata;

    -- The doorbell. Only while a daemon has said it is asleep: NOTIFY serializes the
    -- commits of every notifying transaction in the cluster.
    IF EXISTS (SELECT 1 FROM cqrs.listeners l WHERE l.sleeping AND l.expires_at > now()) THEN
        PERFORM pg_notify('cqrs_outbox', '');
    END IF;
    RETURN NULL;
END
$$;
