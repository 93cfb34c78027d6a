-- What every command returns: token is the command transaction's xid, for cqrs.caught_up().
CREATE TYPE cqrs.receipt AS (
    command_id   uuid,
    aggregate_id uuid,
    version      integer,
    token        bigint,
    duplicate    boolean
);
