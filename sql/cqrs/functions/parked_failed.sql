-- A parked event failed once more when applied again (cqrs.apply_parked rolled back): it
-- stays parked with the new error, no longer queued.
CREATE OR REPLACE FUNCTION cqrs.parked_failed(projection text, "position" bigint, error text, sqlstate text)
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE cqrs.parked k
       SET error = left(coalesce(parked_failed.error, 'unknown error'), 2000),
           sqlstate = left(parked_failed.sqlstate, 5),
           attempts = k.attempts + 1, at = now(), retry = false
     WHERE k.projection = parked_failed.projection AND k.position = parked_failed.position;
$$;
