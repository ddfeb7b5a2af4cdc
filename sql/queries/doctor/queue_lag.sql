-- pgcrew doctor: per queue, the available tasks that are due and the age of the oldest one
-- (how long it has been waiting to be claimed), largest lag first.
SELECT t.queue,
       count(*) AS due,
       extract(epoch FROM now() - min(t.run_at))::float8 AS lag_s
  FROM pgcrew.tasks t
 WHERE t.state = 'available'
   AND t.run_at <= now()
 GROUP BY t.queue
 ORDER BY lag_s DESC, t.queue
