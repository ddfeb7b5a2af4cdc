-- =============================================================================================
-- pgcrew V030: what the operations console (issue #19) shows that must survive restarts and be
-- the same on every instance:
--
--   leader_terms         every leader term (lease, term, holder, when it was taken), written by
--                        triggers on pgcrew.leader in the electing transaction; the leader's
--                        maintenance deletes terms older than `history_retention` (the newest
--                        term of each lease always stays). Read through pgcrew.leader_history.
--   task_events          actions taken on a task by a person (the console's cancel and retry,
--                        single or bulk): who, when, the state before and after; deleted with
--                        the retention of tasks (`task_retention`).
--   queue_pause_events   pauses and resumes of a queue from the console: who, when, whether it
--                        changed anything; deleted after `history_retention`.
--   queue_minutes        per queue and minute: tasks finished (completed, discarded, cancelled)
--                        and the summed wait (due -> claimed) and run (claimed -> finished) time
--                        of completed tasks: the overview's throughput and latency sparklines.
--                        The leader fills it from pgcrew.tasks' finalized index (each pass reads
--                        only the tasks finished since the last minute it wrote, less one
--                        minute for late commits) and keeps one day.
--   events_budget_decisions_idx
--                        the tenant page's budget decisions (ledger events budget_exceeded and
--                        budget_overrun, newest first) without walking all of a tenant's events;
--                        partial, so other ledger appends do not write it.
--
-- No index on tasks.payload: a GIN (jsonb_path_ops) index made the console's payload filter
-- 6 ms p50 / 14 ms p95 instead of 447 / 557 ms on a million tasks, but cost the queue about
-- 30 % of its processing rate (every claim and ack writes the new row version into it) and
-- 15 % of bulk enqueue (`pgcrew bench queue`, measured before/after, alternating). Operators
-- who search payloads often create it themselves (see the README's console section).
-- =============================================================================================

CREATE TABLE pgcrew.leader_terms (
    name        text NOT NULL,
    term        bigint NOT NULL,
    leader_id   text NOT NULL,
    acquired_at timestamptz NOT NULL,
    PRIMARY KEY (name, term)
);
CREATE INDEX leader_terms_acquired_idx ON pgcrew.leader_terms (acquired_at);

CREATE FUNCTION pgcrew.record_leader_term() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgcrew.leader_terms (name, term, leader_id, acquired_at)
    VALUES (NEW.name, NEW.term, NEW.leader_id, NEW.elected_at)
    ON CONFLICT (name, term) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER leader_term_inserted AFTER INSERT ON pgcrew.leader
    FOR EACH ROW EXECUTE FUNCTION pgcrew.record_leader_term();
CREATE TRIGGER leader_term_taken AFTER UPDATE ON pgcrew.leader
    FOR EACH ROW WHEN (OLD.term IS DISTINCT FROM NEW.term)
    EXECUTE FUNCTION pgcrew.record_leader_term();

-- The current lease's term, if any, is recorded now (it was taken before this migration).
INSERT INTO pgcrew.leader_terms (name, term, leader_id, acquired_at)
SELECT name, term, leader_id, elected_at FROM pgcrew.leader
ON CONFLICT (name, term) DO NOTHING;

-- Leader terms, newest first per lease: held_until is when the next term began (NULL for the
-- newest: still held, or released or expired without a successor yet).
CREATE VIEW pgcrew.leader_history AS
SELECT name, term, leader_id, acquired_at,
       lead(acquired_at) OVER (PARTITION BY name ORDER BY term) AS held_until
  FROM pgcrew.leader_terms;

CREATE TABLE pgcrew.task_events (
    id             bigserial PRIMARY KEY,
    task_id        bigint NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    action         text NOT NULL CHECK (action IN ('cancel', 'retry')),
    actor          text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    previous_state text NOT NULL,
    state          text NOT NULL,
    source         text NOT NULL DEFAULT 'console' CHECK (length(source) BETWEEN 1 AND 64)
);
CREATE INDEX task_events_task_idx ON pgcrew.task_events (task_id, id);
CREATE INDEX task_events_at_idx ON pgcrew.task_events (at);

CREATE TABLE pgcrew.queue_pause_events (
    id        bigserial PRIMARY KEY,
    queue     text NOT NULL,
    tenant_id text,
    action    text NOT NULL CHECK (action IN ('pause', 'resume')),
    actor     text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    changed   boolean NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_pause_events_queue_idx ON pgcrew.queue_pause_events (queue, id);
CREATE INDEX queue_pause_events_at_idx ON pgcrew.queue_pause_events (at);

CREATE TABLE pgcrew.queue_minutes (
    minute     timestamptz NOT NULL,
    queue      text NOT NULL,
    completed  bigint NOT NULL,
    discarded  bigint NOT NULL,
    cancelled  bigint NOT NULL,
    timed      bigint NOT NULL,
    wait_ms    float8 NOT NULL,
    run_ms     float8 NOT NULL,
    PRIMARY KEY (minute, queue)
);

CREATE INDEX events_budget_decisions_idx ON pgcrew.events (tenant_id, created_at)
    WHERE event_type IN ('budget_exceeded', 'budget_overrun');
