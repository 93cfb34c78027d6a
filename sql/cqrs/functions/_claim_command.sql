-- cqrs._begin_command without raising CQ005 (cqrs.claim): `receipt` is the first receipt
-- (duplicate = true) if the same command with the same arguments already ran, NULL if the
-- caller should go on; `conflict` is the CQ005 message if the id was used for something else.
-- For commands that raise their own errors, so that the CONTEXT of a refusal names only
-- the command. command_id must not be null (check it with cqrs._id_problem first).
-- The receipt itself is written once, by cqrs._finish_command: until then an advisory
-- lock on the id makes a concurrent twin wait here, and when the first commits the twin's
-- next statement (a new snapshot, in READ COMMITTED) sees its receipt. If the first
-- aborts, the twin runs the command.
CREATE OR REPLACE FUNCTION cqrs._claim_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.claim
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    prior cqrs.commands;
    claim cqrs.claim;
BEGIN
    IF command_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem('command_id', command_id);
    END IF;
    -- Two ids that share a hash only queue behind each other; the primary key keeps them apart.
    PERFORM cqrs._lock('command', command_id::text, true);
    SELECT * INTO prior FROM cqrs.commands c WHERE c.command_id = _claim_command.command_id;
    IF NOT FOUND THEN
        PERFORM set_config('cqrs.command_id', command_id::text, true);
        PERFORM set_config('cqrs.command', command, true);
        PERFORM set_config('cqrs.arguments', arguments::text, true);
    ELSIF prior.command <> command OR prior.arguments <> arguments THEN
        claim.conflict := format('command_id %s was already used for %s(%s), not for %s(%s)',
                                 command_id, prior.command, left(prior.arguments::text, 200),
                                 command, left(arguments::text, 200));
    ELSE
        claim.receipt := ROW(prior.command_id, prior.aggregate_id, prior.version, prior.token, true)::cqrs.receipt;
    END IF;
    RETURN claim;
END
$$;
