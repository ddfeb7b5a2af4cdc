SELECT coalesce(max(version), 0)::int8 FROM pgcrew.refinery_schema_history
