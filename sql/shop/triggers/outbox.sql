-- Every change to the write model appends events to cqrs.outbox in the same transaction.
-- Order lines belong to their order's aggregate; they are only ever added with version 1.
SELECT cqrs.capture_changes('shop.customers', 'customer', 'customer', 'id', 'version');
SELECT cqrs.capture_changes('shop.products', 'product', 'product', 'id', 'version');
SELECT cqrs.capture_changes('shop.orders', 'order', 'order', 'id', 'version');
SELECT cqrs.capture_changes('shop.order_lines', 'order', 'order_line', 'order_id');
