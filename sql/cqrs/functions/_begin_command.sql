-- Claims command_id for this transaction and tags its events with it. Returns the first
-- receipt (duplicate = true) if the same command with the same arguments already ran,
-- NULL if the caller should go on; CQ005 if the id was used for something else.
-- The receipt itself is written once, by cqrs._finish_command: until then an advisory
-- lock on the id makes a concurrent twin wait here, and when the first commits the twin's
-- next statement (a new snapshot, in READ COMMITTED) sees its receipt. If the first
-- aborts, the twin runs the command.
CREATE OR REPLACE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
BEGIN
    PERFORM cqrs._require_id('command_id', command_id);
    -- Key space 1668444017 is the commands' (1668444016 is the projections'). Two ids that
    -- share a hash only queue behind each other; the primary key keeps them apart.
    PERFORM pg_advisory_xact_lock(1668444017, hashtext(command_id::text));
    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _begin_command.command_id;
    IF NOT FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        PERFORM set_config('cqrs.arguments', arguments::text, true);
        RETURN NULL;
    END IF;

    IF prior.command <> command OR prior.arguments <> arguments THEN
        PERFORM cqrs._fail('CQ005', format('command_id %s was already used for %s(%s), not for %s(%s)',
                                           command_id, prior.command, left(prior.arguments::text, 200),
                                           command, left(arguments::text, 200)));
    END IF;
    RETURN ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
END
$$;
