-- Whether few enough tasks match the console's other task filters for the bounded payload
-- search to look at all of them (ui/tasks_payload_window.sql): how many match, counting no
-- further than $6. Only used with a state filter of available or running and no kind filter
-- (queue and tenant are that state's partial index's columns), so it reads at most $6 index
-- entries.
SELECT count(*)
  FROM (SELECT 1
          FROM pgcrew.tasks
         WHERE ($1::text IS NULL OR queue = $1)
           AND ($2::text IS NULL OR state = $2)
           AND ($3::text IS NULL OR tenant_id = $3)
           AND ($4::text IS NULL OR kind = $4)
           AND ($5::int8 IS NULL OR id < $5)
         LIMIT $6) m
