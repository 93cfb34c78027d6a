-- Whether the login calling a SECURITY DEFINER diagnostic may see what pg_stat_activity
-- shows only to members of a session's role or of pg_read_all_stats (its state, times and
-- query): such a function, run as the owner, must not show the caller more.
CREATE OR REPLACE FUNCTION cqrs._may_see(session_role oid)
RETURNS boolean
LANGUAGE sql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT session_role IS NOT NULL
           AND (pg_has_role(session_user, session_role, 'USAGE')
                OR pg_has_role(session_user, 'pg_read_all_stats', 'USAGE'));
$$;
