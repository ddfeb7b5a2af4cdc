-- A run of tenant bench-a with events.
SELECT e.run_id FROM pgcrew.events e WHERE e.tenant_id = 'bench-a' LIMIT 1
