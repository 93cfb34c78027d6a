-- Records the command's outcome for retries and returns its receipt.
CREATE FUNCTION cqrs._finish_command(command_id uuid, aggregate_id uuid, version integer)
RETURNS cqrs.receipt
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE cqrs.commands c
       SET aggregate_id = _finish_command.aggregate_id, version = _finish_command.version
     WHERE c.command_id = _finish_command.command_id
    RETURNING c.command_id, c.aggregate_id, c.version, c.token, false;
$$;
