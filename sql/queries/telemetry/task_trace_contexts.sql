-- The trace context each claimed task continues: its run's (one trace per agent run, across
-- every task of the run) or else its own. $1 task ids.
SELECT t.id, coalesce(r.trace_context, t.trace_context) AS trace_context
  FROM pgcrew.tasks t
  LEFT JOIN pgcrew.runs r ON r.id = t.run_id
 WHERE t.id = ANY($1::int8[])
   AND coalesce(r.trace_context, t.trace_context) IS NOT NULL
