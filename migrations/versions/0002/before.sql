-- 0002, first: drops and ALTERs that the new definitions below need.
SELECT 1;
