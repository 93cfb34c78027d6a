-- What cqrs._claim_command returns: the first receipt if the command already ran
-- (duplicate = true), or the CQ005 message if its id was used for something else; both
-- NULL when the caller should go on.
CREATE TYPE cqrs.claim AS (
    receipt  cqrs.receipt,
    conflict text
);
