-- pgcrew doctor: whether the doctor's role is a superuser, and whether it owns the pgcrew tables
-- (or is a member of their owner).
SELECT r.rolsuper AS superuser,
       pg_has_role(current_user, (SELECT c.relowner FROM pg_catalog.pg_class c
                                   WHERE c.oid = to_regclass('pgcrew.runs')), 'USAGE') AS owner
  FROM pg_catalog.pg_roles r
 WHERE r.rolname = current_user
