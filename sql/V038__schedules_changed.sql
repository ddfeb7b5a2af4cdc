-- =============================================================================================
-- pgcrew V038: wake the leader's scheduler when the schedules change (issue #22: coordination
-- at idle). The scheduler used to look at `pgcrew.schedules` every second (a fenced
-- transaction of 5 statements) so that a schedule created or enabled on another instance got
-- its first fire within a second; it now sleeps until the next fire (or, with no enabled
-- schedule, until woken, with a long safety poll) and is woken by `pgcrew_schedules_changed`.
--
--   notify_schedules_changed()   trigger function: pg_notify('pgcrew_schedules_changed', '{}')
--   schedules_changed            AFTER INSERT OR DELETE, per statement
--   schedules_changed_update     AFTER UPDATE, per row, only when the change can make the next
--                                fire earlier or stops/starts a schedule: `enabled` changed, or
--                                `next_fire_at` cleared or moved earlier (a changed timetable
--                                clears it: `schedule/set`, `set_schedule_enabled`). The
--                                leader's own moves of `next_fire_at` (later, after a fire or
--                                when it parks a schedule) notify nothing, so a fire does not
--                                wake the scheduler again.
--
-- NOTIFY is sent at commit, so the scheduler re-reads a committed change. The payload names
-- nothing (any role can LISTEN on any channel): it is only a wake-up. A manual fire
-- (`fire_schedule(..., p_manual => true)`) changes no row of `pgcrew.schedules` and notifies
-- nothing: it changes nothing the scheduler reads.
-- =============================================================================================

CREATE FUNCTION pgcrew.notify_schedules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcrew_schedules_changed', '{}');
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgcrew.notify_schedules_changed() FROM PUBLIC;

CREATE TRIGGER schedules_changed AFTER INSERT OR DELETE ON pgcrew.schedules
    FOR EACH STATEMENT EXECUTE FUNCTION pgcrew.notify_schedules_changed();

CREATE TRIGGER schedules_changed_update AFTER UPDATE ON pgcrew.schedules
    FOR EACH ROW
    WHEN (NEW.enabled IS DISTINCT FROM OLD.enabled
          OR (NEW.next_fire_at IS NULL AND OLD.next_fire_at IS NOT NULL)
          OR NEW.next_fire_at < OLD.next_fire_at)
    EXECUTE FUNCTION pgcrew.notify_schedules_changed();
