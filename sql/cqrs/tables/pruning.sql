-- One row, the lock that keeps cqrs.prune and a reader that starts from the oldest
-- history apart. cqrs.prune locks it FOR UPDATE before it reads where every reader is;
-- cqrs.register_projection, and cqrs.create_subscription from the beginning, lock it FOR
-- SHARE before they look at what history is left. A reader still being created is either
-- committed by the time prune reads the checkpoints (and holds its history), or starts
-- after prune has committed and sees what it dropped. A row, not an advisory key: a lock
-- no login outside the engine can take.
CREATE TABLE cqrs.pruning (
    one boolean PRIMARY KEY DEFAULT true CHECK (one)
);
INSERT INTO cqrs.pruning DEFAULT VALUES;
