-- Prompt cancellation of running tasks: a cancellation request on a running task NOTIFYs
-- `pgcrew_task_cancel_requested` (payload: task id and the claiming instance), so the owning
-- worker pool re-reads its tasks' cancellation flags at once instead of at its next heartbeat.
-- As everywhere, the notification is only a wake-up: the pool reads `cancel_requested_at` from
-- the table. Repeated requests do not notify again.
CREATE OR REPLACE FUNCTION pgcrew.cancel_task(p_id bigint)
RETURNS TABLE (previous_state text, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev text;
    v_deps boolean;
    v_owner text;
    v_requested timestamptz;
BEGIN
    SELECT t.state, t.has_dependants, t.claimed_by, t.cancel_requested_at
      INTO v_prev, v_deps, v_owner, v_requested
      FROM pgcrew.tasks t WHERE t.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_prev IN ('scheduled', 'available', 'retryable') THEN
        UPDATE pgcrew.tasks t
           SET state = 'cancelled', finalized_at = now(), pending_deps = 0,
               last_error = 'cancelled by request',
               errors = t.errors || jsonb_build_array(jsonb_build_object(
                   'attempt', t.attempts, 'at', now(), 'error', 'cancelled by request'))
         WHERE t.id = p_id;
        IF v_deps THEN
            PERFORM pgcrew.cancel_dependants(ARRAY[p_id], 'a dependency was cancelled');
        END IF;
        RETURN QUERY SELECT v_prev, 'cancelled'::text;
    ELSIF v_prev = 'running' THEN
        IF v_requested IS NULL THEN
            UPDATE pgcrew.tasks t SET cancel_requested_at = now() WHERE t.id = p_id;
            PERFORM pg_notify('pgcrew_task_cancel_requested',
                              json_build_object('task_id', p_id, 'instance_id', v_owner)::text);
        END IF;
        RETURN QUERY SELECT v_prev, 'running'::text;
    ELSE
        RETURN QUERY SELECT v_prev, v_prev;
    END IF;
END $$;
