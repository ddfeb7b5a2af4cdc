-- =============================================================================================
-- pgcrew V033: discarding a task by hand (issue #19: the operations console's cancel / retry /
-- discard, single and bulk), as users of Oban and Sidekiq expect it: a task that is not
-- running and not finished (available, scheduled, retryable) moves to `discarded` with the
-- reason recorded as its last error; its dependants then behave as for any discarded parent
-- (V011: those not started are cancelled, a retry of them is refused until the parent is
-- retried). A running or finished task is left alone (the caller refuses the action).
--
--   discard_task(id, reason)   returns (previous_state, state); no row when the task does not
--                              exist; state = previous_state when nothing changed.
--   task_events.action         accepts 'discard' besides 'cancel' and 'retry'.
-- =============================================================================================

CREATE FUNCTION pgcrew.discard_task(p_id bigint, p_reason text)
RETURNS TABLE (previous_state text, state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_prev text;
    v_deps boolean;
    v_reason text := coalesce(nullif(btrim(p_reason), ''), 'discarded by request');
BEGIN
    SELECT t.state, t.has_dependants INTO v_prev, v_deps
      FROM pgcrew.tasks t WHERE t.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_prev NOT IN ('scheduled', 'available', 'retryable') THEN
        RETURN QUERY SELECT v_prev, v_prev;
        RETURN;
    END IF;
    UPDATE pgcrew.tasks t
       SET state = 'discarded', finalized_at = now(), pending_deps = 0,
           last_error = v_reason,
           errors = t.errors || jsonb_build_array(jsonb_build_object(
               'attempt', t.attempts, 'at', now(), 'error', v_reason))
     WHERE t.id = p_id;
    IF v_deps THEN
        PERFORM pgcrew.cancel_dependants(ARRAY[p_id], 'a dependency was discarded');
    END IF;
    RETURN QUERY SELECT v_prev, 'discarded'::text;
END $$;

ALTER TABLE pgcrew.task_events DROP CONSTRAINT task_events_action_check;
ALTER TABLE pgcrew.task_events ADD CONSTRAINT task_events_action_check
    CHECK (action IN ('cancel', 'retry', 'discard'));
