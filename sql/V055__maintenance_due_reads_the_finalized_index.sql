-- pgcrew V055: the leader's maintenance check no longer reads the whole tasks table on every
-- pass (issue #23, found with `pgcrew bench queue --retained`).
--
-- pgcrew.maintenance_due (V041) asks whether the console's per-minute figures have tasks to
-- count: an EXISTS over the tasks finished since the newest minute written. That bound is a
-- subquery's value, unknown to the planner, which then expects a third of the table to match
-- and, for an EXISTS, picks a sequential scan to find the first. When nothing has finished
-- since (an idle queue, or finished tasks older than the window) the scan reads every row:
-- 2.0 s and 299,383 buffers with 10 million retained tasks, once per pass (every minute by
-- default), its snapshot holding back the removal of dead row versions meanwhile. Now the probe
-- is the first such task in finalized order (ORDER BY finalized_at LIMIT 1), which the planner
-- reads from tasks_finalized_idx whatever it expects: a few index pages. The rest of the
-- function is V041's, unchanged.
-- Test: coord::an_idle_maintenance_pass_does_not_read_the_tasks_table.

CREATE OR REPLACE FUNCTION pgcrew.maintenance_due(
    p_lease text,
    p_instance text,
    p_term bigint,
    p_instance_ttl_us bigint,
    p_task_heartbeat_us bigint,
    p_task_retention_us bigint,
    p_history_retention_us bigint,
    p_stuck_run_us bigint)
RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_due text[] := '{}';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgcrew.leader l
                    WHERE l.name = p_lease AND l.leader_id = p_instance AND l.term = p_term
                      AND l.expires_at > now()) THEN
        RETURN NULL;
    END IF;
    -- coord/delete_stale_instances
    IF EXISTS (SELECT 1 FROM pgcrew.instances
                WHERE last_heartbeat_at < now() - p_instance_ttl_us * interval '1 microsecond') THEN
        v_due := v_due || 'stale_instances'::text;
    END IF;
    -- runs/stuck_running
    IF EXISTS (SELECT 1 FROM pgcrew.runs
                WHERE state = 'running' AND started_at < now() - p_stuck_run_us * interval '1 microsecond'
                  AND (lease_expires_at IS NULL OR lease_expires_at <= now())) THEN
        v_due := v_due || 'stuck_runs'::text;
    END IF;
    -- coord/delete_expired_leaders
    IF EXISTS (SELECT 1 FROM pgcrew.leader WHERE name <> p_lease AND expires_at < now()) THEN
        v_due := v_due || 'expired_leaders'::text;
    END IF;
    -- coord/leader_terms_retention
    IF EXISTS (SELECT 1 FROM pgcrew.leader_terms t
                WHERE t.acquired_at < now() - p_history_retention_us * interval '1 microsecond'
                  AND t.term < (SELECT max(n.term) FROM pgcrew.leader_terms n WHERE n.name = t.name)) THEN
        v_due := v_due || 'leader_history_retention'::text;
    END IF;
    -- pgcrew.rescue_tasks (queue/rescue)
    IF EXISTS (SELECT 1 FROM pgcrew.tasks r
                WHERE r.state = 'running'
                  AND (r.heartbeat_at < now() - p_task_heartbeat_us * interval '1 microsecond'
                       OR r.claimed_by IS NULL
                       OR NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.claimed_by))) THEN
        v_due := v_due || 'rescue_tasks'::text;
    END IF;
    -- queue/minutes: tasks finished since the newest minute written, less one, at most an hour
    -- V055: the first such task along tasks_finalized_idx, not EXISTS (see the header).
    IF (SELECT t.finalized_at FROM pgcrew.tasks t
         WHERE t.state IN ('completed', 'discarded', 'cancelled')
           AND t.finalized_at >= (
               SELECT greatest(coalesce(max(minute) - interval '1 minute', '-infinity'),
                               date_trunc('minute', now()) - interval '1 hour')
                 FROM pgcrew.queue_minutes)
         ORDER BY t.finalized_at LIMIT 1) IS NOT NULL THEN
        v_due := v_due || 'queue_minutes'::text;
    END IF;
    -- queue/retention
    IF EXISTS (SELECT 1 FROM pgcrew.tasks
                WHERE state IN ('completed', 'discarded', 'cancelled')
                  AND finalized_at < now() - p_task_retention_us * interval '1 microsecond') THEN
        v_due := v_due || 'task_retention'::text;
    END IF;
    -- queue/history_retention
    IF EXISTS (SELECT 1 FROM pgcrew.task_events
                WHERE at < now() - p_task_retention_us * interval '1 microsecond')
       OR EXISTS (SELECT 1 FROM pgcrew.queue_pause_events
                   WHERE at < now() - p_history_retention_us * interval '1 microsecond')
       OR EXISTS (SELECT 1 FROM pgcrew.queue_minutes WHERE minute < now() - interval '1 day') THEN
        v_due := v_due || 'queue_history_retention'::text;
    END IF;
    -- runs/release_dead_leases
    IF EXISTS (SELECT 1 FROM pgcrew.runs r
                WHERE r.lease_owner IS NOT NULL
                  AND NOT EXISTS (
                      SELECT 1 FROM pgcrew.instances i
                       WHERE i.id = r.lease_owner
                          OR r.lease_owner LIKE replace(replace(replace(i.id, '\', '\\'), '%', '\%'), '_', '\_') || '/%')) THEN
        v_due := v_due || 'dead_instance_run_leases'::text;
    END IF;
    -- tenancy/release_orphaned_reservations (with the default age, the stuck-run timeout)
    IF EXISTS (SELECT 1 FROM pgcrew.budget_reservations b
                WHERE (b.instance_id IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = b.instance_id))
                   OR b.created_at < now() - p_stuck_run_us * interval '1 microsecond') THEN
        v_due := v_due || 'release_orphaned_reservations'::text;
    END IF;
    -- schedule/retention
    IF EXISTS (SELECT 1 FROM pgcrew.schedule_fires
                WHERE created_at < now() - p_task_retention_us * interval '1 microsecond') THEN
        v_due := v_due || 'schedule_fire_retention'::text;
    END IF;
    RETURN v_due;
END $$;

-- The leader's alone: not for PUBLIC (tenant roles), as every function of the schema.
REVOKE EXECUTE ON FUNCTION pgcrew.maintenance_due(text, text, bigint, bigint, bigint, bigint, bigint, bigint) FROM PUBLIC;
