-- The rows that cqrs.register_projection inserts now, for the views registered before.
INSERT INTO cqrs.refreshing (projection) SELECT p.name FROM cqrs.projections p WHERE p.kind = 'matview';
