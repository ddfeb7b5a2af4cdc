-- pgcrew doctor: tenant roles that can log in over TCP without a password: a `trust` line of
-- pg_hba.conf (other than `local`) admits them to this database. pg_hba_file_rules is readable
-- by superusers only; the caller runs this only as one.
SELECT b.role_name,
       array_agg(h.line_number ORDER BY h.line_number) AS lines
  FROM pgcrew.tenant_role_bindings b
  JOIN pg_catalog.pg_roles r ON r.oid = b.role_oid
  JOIN pg_catalog.pg_hba_file_rules h
    ON h.auth_method = 'trust'
   AND h.type <> 'local'
   AND h.error IS NULL
   AND (h.user_name && ARRAY['all', r.rolname::text]
        OR EXISTS (SELECT 1
                     FROM unnest(h.user_name) AS u(name)
                     JOIN pg_catalog.pg_roles g ON u.name LIKE '+%' AND g.rolname = substr(u.name, 2)
                    WHERE pg_has_role(r.oid, g.oid, 'MEMBER')))
   AND (h.database && ARRAY['all', current_database()::text]
        OR ('sameuser' = ANY (h.database) AND r.rolname = current_database()))
 WHERE r.rolcanlogin
 GROUP BY b.role_name
 ORDER BY b.role_name
