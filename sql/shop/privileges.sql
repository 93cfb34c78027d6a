-- Least privilege for the shop (the cqrs core's own grants are in sql/cqrs/privileges.sql):
-- no function is executable by PUBLIC; each group role gets only what its users need.
-- SECURITY DEFINER functions do the rest as the owner.
REVOKE ALL ON SCHEMA shop, shop_read, shop_proj FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shop, shop_read, shop_proj FROM PUBLIC;

-- cqrs_writer: the commands, nothing else.
GRANT USAGE ON SCHEMA shop TO cqrs_writer;
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

-- cqrs_reader: the read model.
GRANT USAGE ON SCHEMA shop_read TO cqrs_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA shop_read TO cqrs_reader;
