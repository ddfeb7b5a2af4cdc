-- pgcrew doctor: whether the doctor's role is a superuser.
SELECT r.rolsuper AS superuser
  FROM pg_catalog.pg_roles r
 WHERE r.rolname = current_user
