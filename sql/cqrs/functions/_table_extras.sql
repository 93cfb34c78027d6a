-- What deployers added to table t beyond its columns, constraints, indexes, storage
-- parameters and grants (which a rebuild's copy has already): its comment, row-level
-- security (enabled, forced) and policies, user triggers, publication membership and
-- replica identity, as the statements that add them to a table of the same name. A
-- rebuild reads them before it drops t and runs them on the new table once it has t's name.
CREATE OR REPLACE FUNCTION cqrs._table_extras(t regclass)
RETURNS text[]
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(statement ORDER BY ord, statement), '{}')
      FROM (
        SELECT 1 AS ord, format('COMMENT ON TABLE %s IS %L', t, d.description) AS statement
          FROM pg_description d
         WHERE d.classoid = 'pg_class'::regclass AND d.objoid = t AND d.objsubid = 0
        UNION ALL
        SELECT 2, format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t) FROM pg_class c WHERE c.oid = t AND c.relrowsecurity
        UNION ALL
        SELECT 2, format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t) FROM pg_class c WHERE c.oid = t AND c.relforcerowsecurity
        UNION ALL
        SELECT 3, format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', pol.polname, t,
                         CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                         CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                         WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                         (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                            FROM unnest(pol.polroles) r),
                         ' USING (' || pg_get_expr(pol.polqual, pol.polrelid) || ')',
                         ' WITH CHECK (' || pg_get_expr(pol.polwithcheck, pol.polrelid) || ')')
          FROM pg_policy pol
         WHERE pol.polrelid = t
        UNION ALL
        SELECT 4, pg_get_triggerdef(tg.oid) ||
                  CASE tg.tgenabled WHEN 'D' THEN format('; ALTER TABLE %s DISABLE TRIGGER %I', t, tg.tgname)
                                    WHEN 'R' THEN format('; ALTER TABLE %s ENABLE REPLICA TRIGGER %I', t, tg.tgname)
                                    WHEN 'A' THEN format('; ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', t, tg.tgname)
                                    ELSE '' END
          FROM pg_trigger tg
         WHERE tg.tgrelid = t AND NOT tg.tgisinternal
        UNION ALL
        SELECT 5, format('ALTER PUBLICATION %I ADD TABLE %s', pb.pubname, t)
          FROM pg_publication_rel pr JOIN pg_publication pb ON pb.oid = pr.prpubid
         WHERE pr.prrelid = t
        UNION ALL
        SELECT 6, format('ALTER TABLE %s REPLICA IDENTITY %s', t,
                         CASE c.relreplident WHEN 'f' THEN 'FULL' WHEN 'n' THEN 'NOTHING'
                              ELSE format('USING INDEX %I', (SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                                                             WHERE x.indrelid = t AND x.indisreplident)) END)
          FROM pg_class c
         WHERE c.oid = t AND c.relreplident IN ('f', 'n', 'i')
      ) extras;
$$;
