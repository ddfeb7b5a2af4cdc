SELECT to_regclass('pgcrew.refinery_schema_history') IS NOT NULL
