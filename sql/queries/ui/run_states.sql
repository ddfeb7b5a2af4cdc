-- Runs per state for the console's overview: live states in all (runs_live_idx), finished
-- states over the last hour (runs_retention_idx).
SELECT state, count(*)::int8 AS runs
  FROM pgcrew.runs WHERE state IN ('pending', 'running', 'waiting') GROUP BY state
UNION ALL
SELECT state || ' (1 h)', count(*)::int8
  FROM pgcrew.runs
 WHERE finalized_at > now() - interval '1 hour' AND retained_at IS NULL
   AND state IN ('completed', 'failed', 'cancelled')
 GROUP BY state
ORDER BY 1
