-- The example domain's write model: normalized tables, private to the command functions.
CREATE SCHEMA shop;
