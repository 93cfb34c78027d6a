-- Least privilege: no function is executable by PUBLIC; each group role gets only what
-- its users need. SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA cqrs, shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA cqrs, shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else (cqrs for the receipt type only).
GRANT USAGE ON SCHEMA shop, cqrs TO cqrs_writer;
GRANT EXECUTE ON FUNCTION
    shop.register_customer(uuid, text, text),
    shop.rename_customer(uuid, uuid, text, integer),
    shop.add_product(uuid, text, text, bigint, integer),
    shop.restock(uuid, text, integer),
    shop.change_price(uuid, text, bigint),
    shop.place_order(uuid, uuid, jsonb),
    shop.cancel_order(uuid, uuid, integer),
    shop.ship_order(uuid, uuid, integer)
TO cqrs_writer;

-- cqrs_reader: the read model and read-your-writes.
GRANT USAGE ON SCHEMA shop_read, cqrs TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;
GRANT EXECUTE ON FUNCTION cqrs.caught_up(bigint, text) TO cqrs_reader;

-- cqrs_listener: what the daemon calls, and the list of projections it runs. A python
-- projection's handler writes its tables as this role: grant those with the projection.
GRANT USAGE ON SCHEMA cqrs TO cqrs_listener;
GRANT SELECT ON cqrs.projections TO cqrs_listener;
GRANT EXECUTE ON FUNCTION
    cqrs.run_projection(text, integer, interval),
    cqrs.claim_batch(text, integer),
    cqrs.batch_events(text, xid8, bigint, xid8, bigint),
    cqrs.complete_batch(text, xid8, bigint, bigint, xid8, integer),
    cqrs.listener_heartbeat(text, boolean, interval),
    cqrs.listener_exit(text),
    cqrs.projection_status(),
    cqrs.fence_blockers(),
    cqrs.fence_status(),
    cqrs.caught_up(bigint, text)
TO cqrs_listener;
