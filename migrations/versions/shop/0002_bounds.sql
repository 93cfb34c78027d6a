-- shop_0002: place_order's lines are bounded as given (a quantity's text at most 20
-- characters), as the engine's text arguments are (cqrs_0002).

-- sql/shop/functions/_parse_order_lines.sql
-- Validates place_order's lines: a JSON array of 1 to 100 {"sku": text, "quantity": integer > 0},
-- each sku once. Returns them as two arrays in line order, or (arrays NULL) `problem`: the
-- CQ001 message naming the first bad entry, which place_order raises.
CREATE OR REPLACE FUNCTION shop._parse_order_lines(lines jsonb, OUT skus text[], OUT quantities integer[],
                                                   OUT problem text)
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    line jsonb;
    i integer := 0;
    sku text;
    quantity numeric;
    unknown text;
BEGIN
    IF lines IS NULL THEN
        problem := 'lines must not be null';
        RETURN;
    ELSIF jsonb_typeof(lines) <> 'array' THEN
        problem := format('lines must be a JSON array, got %s: %s', jsonb_typeof(lines), left(lines::text, 80));
        RETURN;
    ELSIF jsonb_array_length(lines) NOT BETWEEN 1 AND 100 THEN
        problem := format('lines must hold 1 to 100 entries, got %s', jsonb_array_length(lines));
        RETURN;
    END IF;

    skus := '{}';
    quantities := '{}';
    FOR line IN SELECT value FROM jsonb_array_elements(lines) LOOP
        i := i + 1;
        IF jsonb_typeof(line) <> 'object' THEN
            problem := format('lines[%s] must be an object, got %s', i, left(line::text, 80));
        ELSIF jsonb_typeof(line -> 'sku') IS DISTINCT FROM 'string' THEN
            problem := format('lines[%s].sku must be a string, got %s',
                              i, coalesce(left((line -> 'sku')::text, 80), 'nothing'));
        ELSIF jsonb_typeof(line -> 'quantity') IS DISTINCT FROM 'number' THEN
            problem := format('lines[%s].quantity must be a number, got %s',
                              i, coalesce(left((line -> 'quantity')::text, 80), 'nothing'));
        END IF;
        EXIT WHEN problem IS NOT NULL;
        -- A misspelt or extra key ("qty", "price") is a mistake, not something to ignore.
        SELECT k INTO unknown FROM jsonb_object_keys(line) k WHERE k NOT IN ('sku', 'quantity') LIMIT 1;
        IF FOUND THEN
            problem := format('lines[%s] has an unknown key %L: only "sku" and "quantity" are allowed',
                              i, left(unknown, 40));
            EXIT;
        END IF;
        problem := cqrs._text_problem(format('lines[%s].sku', i), line ->> 'sku', 100);
        EXIT WHEN problem IS NOT NULL;
        sku := cqrs._trim(line ->> 'sku');
        quantity := (line -> 'quantity')::numeric;
        -- as given: a whole number written with a thousand zeros after its point would be
        -- kept so in the command's receipt
        IF length((line -> 'quantity')::text) > 20 OR quantity <> trunc(quantity) OR quantity < 1
           OR quantity > 2147483647 THEN
            problem := format('lines[%s].quantity must be a whole number from 1 to 2147483647, got %s',
                              i, left((line -> 'quantity')::text, 40));
        ELSIF sku = ANY (skus) THEN
            problem := format('lines[%s]: sku %L appears more than once', i, sku);
        END IF;
        EXIT WHEN problem IS NOT NULL;
        skus := skus || sku;
        quantities := quantities || quantity::integer;
    END LOOP;
    IF problem IS NOT NULL THEN
        skus := NULL;
        quantities := NULL;
    END IF;
END
$$;
