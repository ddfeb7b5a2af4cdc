-- pgcrew V018: pgcrew.enqueue_task with named parameters and defaults (issue #18, item 2).
--
-- Called from another language, the SQL enqueue took 11 positional arguments with no defaults,
-- and a NULL priority failed with a not-null violation on pgcrew.tasks.priority. Now every
-- argument but p_kind has the library's default, so
--     SELECT * FROM pgcrew.enqueue_task(p_kind => 'send_email', p_payload => '{"to": "a@b"}');
-- enqueues like `NewTask::new("send_email", payload)`: queue 'default', tenant 'default', no
-- run, priority 2 (normal), due now, 25 attempts, no unique key, no dependencies. An explicit
-- NULL for an argument the library always sets (kind, queue, tenant, priority, payload,
-- max_attempts) is refused with SQLSTATE 22004 naming it; NULL still means "none" for p_run,
-- p_delay_us, p_run_at, p_unique_key and p_depends_on. The library's own enqueue passes every
-- argument and is unchanged. The rest of the body is V011's.

-- p_priority becomes integer (a plain literal such as 3 is an integer, and integer does not
-- convert to smallint implicitly, so `p_priority => 3` found no function); a changed parameter
-- type needs DROP and CREATE. Callers that bind a smallint still resolve to it.
DROP FUNCTION pgcrew.enqueue_task(text, text, text, uuid, smallint, jsonb, bigint, timestamptz,
                                  integer, text, bigint[]);
CREATE FUNCTION pgcrew.enqueue_task(
    p_queue text DEFAULT 'default', p_kind text DEFAULT NULL, p_tenant text DEFAULT 'default',
    p_run uuid DEFAULT NULL, p_priority integer DEFAULT 2, p_payload jsonb DEFAULT '{}',
    p_delay_us bigint DEFAULT NULL, p_run_at timestamptz DEFAULT NULL,
    p_max_attempts integer DEFAULT 25, p_unique_key text DEFAULT NULL,
    p_depends_on bigint[] DEFAULT NULL)
RETURNS TABLE (id bigint, state text, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_size integer := octet_length(p_payload::text);
BEGIN
    -- The arguments the library always gives: an explicit NULL is a mistake, not "the default"
    -- (omit the argument for that).
    IF p_kind IS NULL OR p_queue IS NULL OR p_tenant IS NULL OR p_priority IS NULL
       OR p_payload IS NULL OR p_max_attempts IS NULL THEN
        RAISE EXCEPTION 'pgcrew.enqueue_task: % must not be NULL',
            CASE WHEN p_kind IS NULL THEN 'p_kind (the task kind)'
                 WHEN p_queue IS NULL THEN 'p_queue'
                 WHEN p_tenant IS NULL THEN 'p_tenant'
                 WHEN p_priority IS NULL THEN 'p_priority'
                 WHEN p_payload IS NULL THEN 'p_payload'
                 ELSE 'p_max_attempts' END
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'p_kind is required; omit any other argument to get its default: p_queue ''default'', p_tenant ''default'', p_priority 2 (normal), p_payload ''{}'', p_max_attempts 25';
    END IF;
    IF p_priority NOT BETWEEN 0 AND 4 THEN
        RAISE EXCEPTION 'pgcrew.enqueue_task: p_priority is %; it must be 0 (critical) to 4 (batch)', p_priority
            USING ERRCODE = 'check_violation', HINT = '2 is normal, the default';
    END IF;
    IF v_size > 262144 THEN
        RAISE EXCEPTION 'payload is % bytes of JSON; at most 262144 are allowed', v_size
            USING ERRCODE = 'PC021',
                  HINT = 'store large data elsewhere (e.g. an artifact) and pass a reference';
    END IF;
    IF p_delay_us > 315360000000000 THEN
        RAISE EXCEPTION 'delay is % µs; at most 3650 days (315360000000000 µs) are allowed', p_delay_us
            USING ERRCODE = 'PC022', HINT = 'give a run_at instead, or a shorter delay';
    END IF;
    SELECT i.id, i.state, i.duplicate INTO r
      FROM pgcrew.insert_task(p_queue, p_kind, p_tenant, p_run, p_priority::smallint, p_payload,
                              p_delay_us, p_run_at, p_max_attempts, p_unique_key,
                              p_depends_on) i;
    -- As pgcrew.wake_queues(ARRAY[p_queue]), inline (see V007).
    IF r.state = 'available' AND NOT r.duplicate
       AND EXISTS (SELECT FROM pgcrew.queue_waiters w WHERE w.queue = p_queue) THEN
        PERFORM pg_notify('pgcrew_task_available', json_build_object('queue', p_queue)::text);
    END IF;
    RETURN QUERY SELECT r.id, r.state, r.duplicate;
END $$;
REVOKE ALL ON FUNCTION pgcrew.enqueue_task(text, text, text, uuid, integer, jsonb, bigint,
                                           timestamptz, integer, text, bigint[]) FROM PUBLIC;
