-- pgcrew doctor: the server settings the checklist looks at, as this session sees them (role and
-- database settings included). Absent names (e.g. reserved_connections before PostgreSQL 16)
-- return no row.
SELECT s.name, s.setting, s.unit
  FROM pg_catalog.pg_settings s
 WHERE s.name = ANY ($1::text[])
