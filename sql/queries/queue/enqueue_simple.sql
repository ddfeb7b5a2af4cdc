-- Enqueue one task without dependencies or unique key: a plain INSERT (the tenant is locked
-- FOR KEY SHARE; an unknown tenant yields NULL and fails on NOT NULL). When the task is available
-- at once and a pool waits on its queue, the same statement NOTIFYs `pgcrew_task_available`
-- (the CASE keeps the NOTIFY from running otherwise): the test of `pgcrew.wake_queues`,
-- inline, because calling it nearly doubles this statement's cost on an idle backend (V007).
WITH tn AS (
    SELECT tn.id FROM pgcrew.tenants tn WHERE tn.id = $3 FOR KEY SHARE),
v AS (
    SELECT coalesce($8::timestamptz, now() + $7::int8 * interval '1 microsecond') AS run_at),
ins AS (
    INSERT INTO pgcrew.tasks AS t (queue, kind, tenant_id, run_id, priority, state, payload,
                                   max_attempts, run_at)
    SELECT $1, $2, (SELECT tn.id FROM tn), $4, $5,
           CASE WHEN v.run_at > now() THEN 'scheduled' ELSE 'available' END,
           $6, $9, v.run_at
      FROM v
    RETURNING t.id, t.state, t.queue)
SELECT ins.id, ins.state, false AS duplicate,
       CASE WHEN ins.state = 'available'
                 AND EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = ins.queue)
            THEN EXISTS (SELECT FROM pg_notify('pgcrew_task_available',
                                               json_build_object('queue', ins.queue)::text))
            ELSE false END AS notified
  FROM ins
