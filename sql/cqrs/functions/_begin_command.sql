-- Claims command_id for this transaction and tags its events with it (cqrs._claim_command).
-- Returns the first receipt (duplicate = true) if the same command with the same arguments
-- already ran, NULL if the caller should go on; CQ005 if the id was used for something
-- else, CQ001 if it is null.
CREATE OR REPLACE FUNCTION cqrs._begin_command(command_id uuid, command text, arguments jsonb)
RETURNS cqrs.receipt
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    claim cqrs.claim;
BEGIN
    IF command_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ001', MESSAGE = cqrs._id_problem('command_id', command_id);
    END IF;
    claim := cqrs._claim_command(command_id, command, arguments);
    IF claim.conflict IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'CQ005', MESSAGE = claim.conflict;
    END IF;
    RETURN claim.receipt;
END
$$;
