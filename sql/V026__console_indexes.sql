-- =============================================================================================
-- The operations console (issue #19): indexes for its reads on large tables.
--
--   runs_created_idx  the run list, newest first (ORDER BY created_at DESC, id LIMIT n), with or
--                     without a tenant / state / agent filter.
--   runs_live_idx     runs per live state on the overview (pending, running, waiting) without
--                     scanning finished runs.
--
-- Runs change state a handful of times in their life (their events go to pgcrew.events), so two
-- more indexes on pgcrew.runs cost little; nothing is added to pgcrew.tasks, the queue's hot
-- path: the overview reads tasks through the queue's own partial indexes.
-- =============================================================================================

CREATE INDEX runs_created_idx ON pgcrew.runs (created_at DESC, id);
CREATE INDEX runs_live_idx ON pgcrew.runs (state) WHERE state IN ('pending', 'running', 'waiting');

-- The task list filtered by queue and state (`/tasks?queue=q&state=available`) is planned from
-- the combined frequencies of the two columns: without them, a combination that is rare or
-- absent (a queue whose tasks are all finished) looks common, and the planner walks the whole
-- table newest first instead of using the queue's partial indexes (measured: 240 ms against
-- 0.04 ms on a million tasks). Statistics cost nothing on writes, only a little at ANALYZE.
CREATE STATISTICS pgcrew.tasks_queue_state_stats (mcv) ON queue, state FROM pgcrew.tasks;
