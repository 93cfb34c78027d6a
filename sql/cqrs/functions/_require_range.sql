-- CQ001 unless min_value <= value (<= max_value when given); returns value.
CREATE FUNCTION cqrs._require_range(argument text, value bigint, min_value bigint, max_value bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        PERFORM cqrs._fail('CQ001', format('%s must not be null', argument));
    ELSIF value < min_value THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at least %s, got %s', argument, min_value, value));
    ELSIF value > max_value THEN
        PERFORM cqrs._fail('CQ001', format('%s must be at most %s, got %s', argument, max_value, value));
    END IF;
    RETURN value;
END
$$;
