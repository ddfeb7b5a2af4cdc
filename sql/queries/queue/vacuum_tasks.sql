-- The worker pool's vacuum of pgcrew.tasks (issue #23, `queue::worker::vacuum`), once
-- `queue/vacuum_due` says so. SKIP_LOCKED: when another session (autovacuum, another pool)
-- is vacuuming the table, this returns at once instead of waiting. INDEX_CLEANUP ON: the point
-- is the dead entries at the head of tasks_available_idx, which every claim steps over; left
-- to AUTO, a vacuum may skip the indexes when few heap pages hold dead rows. The TOAST table
-- (large payloads) is left to autovacuum: claims and acknowledgements leave nothing dead there.
VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, PROCESS_TOAST FALSE) pgcrew.tasks
