-- Wake-ups are sent by the enqueue paths themselves instead of an AFTER INSERT trigger.
--
-- The statement-level trigger `tasks_inserted` (V003) captured every inserted row in a
-- transition table and ran a PL/pgSQL function per INSERT statement. On an idle server that
-- was the largest single cost of a one-task enqueue beyond the INSERT itself (measured with
-- pgbench, 5 ms idle before each statement, interleaved: 0.371 ms with the trigger, 0.315 ms
-- with the NOTIFY inside the statement, 0.286 ms with no NOTIFY at all), and it sits on the
-- path the wake-up latency target is measured on.
--
-- Now:
-- * `queue/enqueue_simple.sql` and `queue/enqueue_many.sql` (the library's statements) NOTIFY
--   `pgcrew_task_available` {queue} for every queue that got an available task and has a
--   waiting pool, in the same statement;
-- * `pgcrew.enqueue_task` (the public SQL enqueue, also used for dependencies and unique keys)
--   does the same;
-- * `pgcrew.wake_queues(queues)` is the public way to wake pools after writing tasks by plain
--   INSERT / UPDATE: such writes no longer notify by themselves, and pools would otherwise find
--   them at their fallback poll.
-- As before, NOTIFY is only sent to queues with a waiting pool (saturated pools leave
-- `queue_waiters`, so a busy system sends none), and PostgreSQL folds identical payloads within
-- a transaction: at most one notification per queue per transaction.

DROP TRIGGER tasks_inserted ON pgcrew.tasks;
DROP FUNCTION pgcrew.notify_tasks_inserted();

-- Wake the pools waiting on any of p_queues (NULLs and duplicates ignored). Returns how many
-- queues were notified (those with a waiting pool). For operators' own SQL writes: the
-- library's statements and pgcrew.enqueue_task inline the same test (waiting pool? then
-- NOTIFY) instead of calling this, because a call to it costs more than the enqueue itself on
-- an idle backend (pgbench, 5 ms idle, interleaved: one-task enqueue 0.38-0.41 ms inline,
-- 0.66-0.72 ms calling this SQL function, 0.58 ms calling a PL/pgSQL version of it).
CREATE FUNCTION pgcrew.wake_queues(p_queues text[]) RETURNS integer
LANGUAGE sql AS $$
    SELECT count(*)::integer
      FROM (SELECT DISTINCT q FROM unnest(p_queues) q WHERE q IS NOT NULL) s
     WHERE CASE WHEN EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = s.q)
                THEN EXISTS (SELECT FROM pg_notify('pgcrew_task_available',
                                                   json_build_object('queue', s.q)::text))
                ELSE false END
$$;

-- The V003 body of enqueue_task becomes pgcrew.insert_task (it inserts, and no longer wakes
-- anyone by itself); pgcrew.enqueue_task keeps its signature and result and adds the wake-up.
ALTER FUNCTION pgcrew.enqueue_task(text, text, text, uuid, smallint, jsonb, bigint, timestamptz,
                                   integer, text, bigint[])
    RENAME TO insert_task;
COMMENT ON FUNCTION pgcrew.insert_task(text, text, text, uuid, smallint, jsonb, bigint,
                                       timestamptz, integer, text, bigint[]) IS
    'Internal: the insert of pgcrew.enqueue_task without its wake-up. Call pgcrew.enqueue_task.';

-- Enqueue one task (dependencies, unique key, delay) atomically and wake the pools waiting on
-- its queue when it is available at once. Returns the task (the existing one, duplicate = true,
-- when the unique key is already taken by a non-final task).
CREATE FUNCTION pgcrew.enqueue_task(
    p_queue text, p_kind text, p_tenant text, p_run uuid, p_priority smallint, p_payload jsonb,
    p_delay_us bigint, p_run_at timestamptz, p_max_attempts integer, p_unique_key text,
    p_depends_on bigint[])
RETURNS TABLE (id bigint, state text, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT i.id, i.state, i.duplicate INTO r
      FROM pgcrew.insert_task(p_queue, p_kind, p_tenant, p_run, p_priority, p_payload,
                              p_delay_us, p_run_at, p_max_attempts, p_unique_key,
                              p_depends_on) i;
    -- As pgcrew.wake_queues(ARRAY[p_queue]), inline (see there).
    IF r.state = 'available' AND NOT r.duplicate
       AND EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = p_queue) THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', p_queue)::text);
    END IF;
    RETURN QUERY SELECT r.id, r.state, r.duplicate;
END $$;
