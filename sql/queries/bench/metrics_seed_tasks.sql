-- bench observability: $1 queues with $2 tasks each, half available, half scheduled an hour on.
INSERT INTO pgcrew.tasks (queue, kind, state, run_at)
SELECT 'queue-' || (i % $1::int), 'noop',
       CASE WHEN i % 2 = 0 THEN 'available' ELSE 'scheduled' END,
       CASE WHEN i % 2 = 0 THEN now() ELSE now() + interval '1 hour' END
  FROM generate_series(1, $1::int * $2::int) i
