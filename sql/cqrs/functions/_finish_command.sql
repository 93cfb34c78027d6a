-- Records the command's receipt, for retries, and returns it: the one write of
-- cqrs.commands per command (cqrs._begin_command claimed the id and kept the command's
-- name and arguments for this). A conflict means a concurrent twin committed first and
-- this transaction could not see it (REPEATABLE READ or SERIALIZABLE): 40001, retry.
CREATE OR REPLACE FUNCTION cqrs._finish_command(command_id uuid, aggregate_id uuid, version integer)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    r cqrs.receipt;
BEGIN
    IF current_setting('cqrs.command_id', true) IS DISTINCT FROM command_id::text THEN
        RAISE EXCEPTION USING ERRCODE = 'assert_failure',  -- a bug in the command, not the caller's doing
            MESSAGE = format('cqrs._finish_command(%s) without cqrs._begin_command(%s) first', command_id, command_id);
    END IF;
    INSERT INTO cqrs.commands AS c (command_id, command, arguments, aggregate_id, version, token)
    VALUES (command_id, current_setting('cqrs.command'), current_setting('cqrs.arguments')::jsonb,
            aggregate_id, version, pg_current_xact_id()::text::bigint)
    ON CONFLICT ON CONSTRAINT commands_pkey DO NOTHING
    RETURNING c.command_id, c.aggregate_id, c.version, c.token, false INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = format('command_id %s was committed by a concurrent transaction that this one cannot see: retry',
                             command_id);
    END IF;
    RETURN r;
END
$$;
