-- pgcrew V054: a waiting run that is cancelled or fails ends its wait.
--
-- A run parked at a durable wait (V020) has a row in pgcrew.run_waits and, when a worker parked
-- it, a task scheduled until the wait's deadline. Cancelling the run (or failing it by hand)
-- left both behind: the wait row stayed until retention deleted the run, and the task stayed
-- scheduled (counted as queued work) until the deadline, perhaps days out, when a worker
-- claimed it only to find the run finished.
--
-- Now, in the same transaction as the run's change, the wait row is deleted and the parked
-- task is cancelled as pgcrew.cancel_task does: at once when it is still parked or made
-- available by a signal (its dependants are cancelled with it), and by a cancellation request
-- to its worker when a worker has just claimed it to resume the run. The run's lock is held
-- before the task's, as in pgcrew.wait_step and pgcrew.signal_run.
-- Test: waits::a_waiting_run_that_is_cancelled_ends_its_wait_and_its_parked_task.

CREATE FUNCTION pgcrew.end_finished_wait() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_task bigint;
BEGIN
    DELETE FROM pgcrew.run_waits w WHERE w.run_id = NEW.id RETURNING w.task_id INTO v_task;
    IF v_task IS NOT NULL THEN
        PERFORM pgcrew.cancel_task(v_task);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER runs_end_finished_wait
    AFTER UPDATE OF state ON pgcrew.runs
    FOR EACH ROW
    WHEN (OLD.state = 'waiting' AND NEW.state IN ('cancelled', 'failed'))
    EXECUTE FUNCTION pgcrew.end_finished_wait();

-- Functions: nothing for PUBLIC (as V010; every migration creating functions revokes again).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgcrew FROM PUBLIC;
