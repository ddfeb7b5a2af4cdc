-- Runs per state for the console's overview.
SELECT state, count(*)::int8 AS runs FROM pgcrew.runs GROUP BY state ORDER BY state
