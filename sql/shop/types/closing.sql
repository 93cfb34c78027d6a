-- What shop._close_order returns: the receipt, or a refusal (errcode, problem) for the
-- command to raise.
CREATE TYPE shop.closing AS (
    receipt cqrs.receipt,
    errcode text,
    problem text
);
