-- Upserts the latest name and email of each customer in the batch into a projection's
-- private customer table. Version-guarded: xid order is not an aggregate's order.
CREATE FUNCTION shop_proj._remember_customers(target regclass, from_tx xid8, from_position bigint, to_tx xid8, to_position bigint)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format(
        'INSERT INTO %s AS c (customer_id, name, email, version)
         SELECT DISTINCT ON (e.aggregate_id)
                e.aggregate_id, e.payload ->> ''name'', e.payload ->> ''email'', e.aggregate_version
           FROM cqrs.batch($1, $2, $3, $4) e
          WHERE e.event_type IN (''customer.created'', ''customer.updated'')
          ORDER BY e.aggregate_id, e.aggregate_version DESC
         ON CONFLICT (customer_id) DO UPDATE
            SET name = excluded.name, email = excluded.email, version = excluded.version
          WHERE c.version < excluded.version', target)
    USING from_tx, from_position, to_tx, to_position;
END
$$;
