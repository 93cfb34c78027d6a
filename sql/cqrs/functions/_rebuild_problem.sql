-- What keeps a rebuild from replacing table t by a new one, as a CQ003 message; NULL when
-- nothing does. The swap drops the old table: objects that depend on it (a view, a foreign
-- key from a table the projection does not own) would have to go with it, and a
-- publication's row filter or column list, or a partition hierarchy, is not carried over.
-- Everything else deployers add is (cqrs._table_extras).
CREATE OR REPLACE FUNCTION cqrs._rebuild_problem(projection text, t regclass, owned regclass[])
RETURNS text
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('cannot rebuild projection %L: %s depends on its table %s; %s', projection, what, t, todo)
      FROM (
        SELECT format('%s %s', CASE v.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END, v.oid::regclass) AS what,
               'drop it before the rebuild and create it again after' AS todo
          FROM pg_depend d
          JOIN pg_rewrite w ON d.classid = 'pg_rewrite'::regclass AND w.oid = d.objid
          JOIN pg_class v ON v.oid = w.ev_class
         WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = t AND v.oid <> t
        UNION ALL
        SELECT format('the foreign key %I of %s', c.conname, c.conrelid::regclass),
               'drop it before the rebuild and add it again after'
          FROM pg_constraint c
         WHERE c.contype = 'f' AND c.confrelid = t AND c.conrelid <> ALL (owned)
        UNION ALL
        SELECT format('publication %I (with a row filter or column list)', pb.pubname),
               'drop the table from it before the rebuild and add it again after'
          FROM pg_publication_rel pr JOIN pg_publication pb ON pb.oid = pr.prpubid
         WHERE pr.prrelid = t AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL)
        UNION ALL
        SELECT 'a partition or inheritance hierarchy', 'a partitioned or inherited table cannot be rebuilt'
          FROM pg_class c
         WHERE c.oid = t AND (c.relkind = 'p' OR c.relispartition
                              OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = t OR i.inhparent = t))
      ) problems
     LIMIT 1;
$$;
