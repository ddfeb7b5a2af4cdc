-- pgcrew V021: sub-agents (issue #18, item 5): an agent calls another agent as a tool; the
-- child is a run of its own, keyed by (parent run, parent step key), with a budget carved out of
-- the parent's remaining run budget and cancelled with its parent.
--
--  * runs.parent_relation tells a fork (`fork`, ReplayPolicy::ForkOnDrift) from a sub-agent run
--    (`subagent`); existing runs with a parent are forks. runs.parent_step_key is the parent's
--    tool step that started the child (unique per parent), runs.carved_budget_usd what was
--    carved out of the parent for it, runs.subagent_depth its depth (0 for a top-level run).
--  * pgcrew.agent_subagents: the sub-agents an agent may call (pgcrew.set_subagents, which
--    refuses a definition that closes a cycle, SQLSTATE PC070).
--  * pgcrew.start_child_run: creates the child (or returns the one already created for the
--    step), refusing a cycle along the parent chain (PC070), a depth over the limit (PC071) and
--    a carve the parent's remaining budget cannot cover (PC072).
--  * Triggers: a child that finishes returns its unused carve to the parent (the parent's
--    reservation drops by the carve and its spend grows by the child's), spend settled on a
--    finished child later is passed up too, and a parent that is cancelled or fails cancels its
--    unfinished children (recursively), whoever made the transition (library, CLI, plain SQL).
--  * Unfinished means pending, running or waiting (V020's durable waits): a waiting child is
--    cancelled with its parent, and a waiting child that fails or is cancelled returns its carve.

-- pgcrew.runs carries no CHECK constraints (V015: each ledger append would prepare them); the
-- rules of the new columns live in a BEFORE trigger that fires only when a run row has a parent
-- or one of these columns is written, and refuses as a CHECK constraint would (23514 with the
-- constraint's name). A run inserted with a parent and no relation is a fork (the fork path
-- predates V021).
ALTER TABLE pgcrew.runs
    ADD COLUMN parent_relation text,
    ADD COLUMN parent_step_key text,
    ADD COLUMN carved_budget_usd numeric(20, 10),
    ADD COLUMN subagent_depth integer NOT NULL DEFAULT 0;

UPDATE pgcrew.runs SET parent_relation = 'fork' WHERE parent_run_id IS NOT NULL;

CREATE UNIQUE INDEX runs_subagent_step_idx ON pgcrew.runs (parent_run_id, parent_step_key)
    WHERE parent_relation = 'subagent';

CREATE FUNCTION pgcrew.check_run_parent() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_constraint text;
    v_column     text;
    v_value      text;
    v_rule       text;
BEGIN
    IF NEW.parent_run_id IS NOT NULL AND NEW.parent_relation IS NULL THEN
        NEW.parent_relation := 'fork';
    END IF;
    IF NOT coalesce(NEW.parent_relation IN ('fork', 'subagent'), true) THEN
        v_constraint := 'runs_parent_relation_check'; v_column := 'parent_relation';
        v_value := NEW.parent_relation; v_rule := 'fork or subagent';
    ELSIF NEW.parent_relation IS NOT NULL AND NEW.parent_run_id IS NULL THEN
        v_constraint := 'runs_parent_relation_parent'; v_column := 'parent_run_id';
        v_value := 'NULL'; v_rule := 'set when parent_relation is';
    ELSIF NEW.parent_relation = 'subagent' AND NEW.parent_step_key IS NULL THEN
        v_constraint := 'runs_subagent_step'; v_column := 'parent_step_key';
        v_value := 'NULL'; v_rule := 'set for a sub-agent run';
    ELSIF NOT coalesce(NEW.carved_budget_usd >= 0 AND NEW.carved_budget_usd < 'Infinity'::numeric, true) THEN
        v_constraint := 'runs_carved_budget_usd_valid'; v_column := 'carved_budget_usd';
        v_value := NEW.carved_budget_usd::text; v_rule := 'a finite USD amount >= 0';
    ELSIF NEW.subagent_depth < 0 THEN
        v_constraint := 'runs_subagent_depth_valid'; v_column := 'subagent_depth';
        v_value := NEW.subagent_depth::text; v_rule := '>= 0';
    ELSE
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'new row for relation "runs" violates check constraint "%": % must be %, got %',
        v_constraint, v_column, v_rule, v_value
        USING ERRCODE = 'check_violation', CONSTRAINT = v_constraint, SCHEMA = 'pgcrew',
              TABLE = 'runs', COLUMN = v_column, DETAIL = format('run %s', NEW.id);
END $$;
REVOKE ALL ON FUNCTION pgcrew.check_run_parent() FROM PUBLIC;

CREATE TRIGGER runs_check_parent
    BEFORE INSERT OR UPDATE OF parent_run_id, parent_relation, parent_step_key, carved_budget_usd,
                               subagent_depth
    ON pgcrew.runs
    FOR EACH ROW
    WHEN (NEW.parent_run_id IS NOT NULL OR NEW.parent_relation IS NOT NULL
          OR NEW.parent_step_key IS NOT NULL OR NEW.carved_budget_usd IS NOT NULL
          OR NEW.subagent_depth <> 0)
    EXECUTE FUNCTION pgcrew.check_run_parent();

CREATE TABLE pgcrew.agent_subagents (
    agent      text NOT NULL REFERENCES pgcrew.agents (name) ON DELETE CASCADE,
    subagent   text NOT NULL CHECK (length(subagent) BETWEEN 1 AND 64),
    budget_usd numeric(20, 10) CHECK (budget_usd >= 0),
    position   integer NOT NULL,
    PRIMARY KEY (agent, subagent)
);

-- A path agent -> ... -> agent through pgcrew.agent_subagents, or NULL when p_agent is on no cycle.
CREATE FUNCTION pgcrew.subagent_cycle(p_agent text) RETURNS text[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE walk(agent, path) AS (
        SELECT s.subagent, ARRAY[p_agent, s.subagent]
          FROM pgcrew.agent_subagents s WHERE s.agent = p_agent
        UNION ALL
        SELECT s.subagent, w.path || s.subagent
          FROM walk w JOIN pgcrew.agent_subagents s ON s.agent = w.agent
         WHERE w.agent <> p_agent
           AND (s.subagent = p_agent OR NOT s.subagent = ANY (w.path))
    )
    SELECT path FROM walk WHERE agent = p_agent LIMIT 1
$$;

-- Replace the sub-agents of p_agent (which must be registered) with p_subagents, each with the
-- budget at the same index of p_budgets (NULL: the parent's whole remaining budget). A list
-- that closes a cycle is refused with PC070 and nothing changes.
CREATE FUNCTION pgcrew.set_subagents(p_agent text, p_subagents text[], p_budgets float8[] DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_cycle text[];
    v_n     integer := coalesce(array_length(p_subagents, 1), 0);
BEGIN
    IF p_agent IS NULL OR p_subagents IS NULL THEN
        RAISE EXCEPTION 'p_agent and p_subagents must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF p_budgets IS NOT NULL AND coalesce(array_length(p_budgets, 1), 0) <> v_n THEN
        RAISE EXCEPTION 'p_budgets has % entries for % sub-agents', coalesce(array_length(p_budgets, 1), 0), v_n
            USING ERRCODE = '22023';
    END IF;
    PERFORM 1 FROM pgcrew.agents WHERE name = p_agent FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % is not registered', p_agent USING ERRCODE = '23503';
    END IF;
    DELETE FROM pgcrew.agent_subagents
     WHERE agent = p_agent AND NOT subagent = ANY (p_subagents);
    INSERT INTO pgcrew.agent_subagents (agent, subagent, budget_usd, position)
    SELECT p_agent, u.s,
           CASE WHEN p_budgets[u.i] IS NULL THEN NULL
                ELSE pgcrew.money_amount(p_budgets[u.i], 'sub-agent budget_usd') END,
           u.i
      FROM unnest(p_subagents) WITH ORDINALITY AS u(s, i)
    ON CONFLICT (agent, subagent) DO UPDATE
        SET budget_usd = EXCLUDED.budget_usd, position = EXCLUDED.position;
    v_cycle := pgcrew.subagent_cycle(p_agent);
    IF v_cycle IS NOT NULL THEN
        RAISE EXCEPTION 'sub-agent cycle: %', array_to_string(v_cycle, ' -> ')
            USING ERRCODE = 'PC070',
                  DETAIL = json_build_object('agent', p_agent, 'chain', v_cycle)::text;
    END IF;
    RETURN v_n;
END $$;

-- Start the sub-agent run of the parent's step p_step_key, or return the one already started
-- for it (created = false). In one statement: the parent is locked; the agents along its parent
-- chain must not include p_agent (PC070) and the child's depth must not pass p_max_depth
-- (PC071); the child's budget (p_budget_usd, or the parent's whole remaining budget when NULL)
-- is reserved on the parent, refused with PC072 (DETAIL: limit, spent, reserved, requested)
-- when the parent's remaining budget cannot cover it. The child has the parent's tenant and
-- session, its budget as its run budget, and a `run_created` event.
CREATE FUNCTION pgcrew.start_child_run(p_parent uuid, p_step_key text, p_agent text, p_prompt text,
                                       p_budget_usd float8 DEFAULT NULL,
                                       p_max_depth integer DEFAULT 4)
RETURNS TABLE (child_id uuid, created boolean, budget_usd float8, depth integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_parent    pgcrew.runs%ROWTYPE;
    v_chain     text[];
    v_requested numeric;
    v_remaining numeric;
    v_carve     numeric;
    v_id        uuid;
BEGIN
    IF p_parent IS NULL OR p_step_key IS NULL OR p_agent IS NULL OR p_prompt IS NULL
       OR p_max_depth IS NULL THEN
        RAISE EXCEPTION 'p_parent, p_step_key, p_agent, p_prompt and p_max_depth must not be NULL'
            USING ERRCODE = '22004';
    END IF;
    SELECT * INTO v_parent FROM pgcrew.runs WHERE id = p_parent FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % not found', p_parent USING ERRCODE = 'PC002';
    END IF;
    SELECT c.id, false, c.carved_budget_usd::float8, c.subagent_depth
      INTO child_id, created, budget_usd, depth
      FROM pgcrew.runs c
     WHERE c.parent_run_id = p_parent AND c.parent_relation = 'subagent'
       AND c.parent_step_key = p_step_key;
    IF FOUND THEN
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_parent.state NOT IN ('pending', 'running') THEN
        RAISE EXCEPTION 'run % is %: it cannot start sub-agents', p_parent, v_parent.state
            USING ERRCODE = 'PC041', DETAIL = v_parent.state;
    END IF;
    WITH RECURSIVE up(id, agent, parent, relation, n) AS (
        SELECT v_parent.id, v_parent.agent_name, v_parent.parent_run_id, v_parent.parent_relation, 0
        UNION ALL
        SELECT r.id, r.agent_name, r.parent_run_id, r.parent_relation, up.n + 1
          FROM up JOIN pgcrew.runs r ON r.id = up.parent
         WHERE up.relation = 'subagent' AND up.n < 10000
    )
    SELECT array_agg(coalesce(agent, '?') ORDER BY n DESC) INTO v_chain FROM up;
    IF p_agent = ANY (v_chain) THEN
        RAISE EXCEPTION 'sub-agent cycle: % -> %', array_to_string(v_chain, ' -> '), p_agent
            USING ERRCODE = 'PC070',
                  DETAIL = json_build_object('agent', p_agent, 'chain', v_chain || p_agent)::text;
    END IF;
    IF v_parent.subagent_depth + 1 > p_max_depth THEN
        RAISE EXCEPTION 'sub-agent % would run at depth %, over the limit of % (chain %)',
            p_agent, v_parent.subagent_depth + 1, p_max_depth, array_to_string(v_chain, ' -> ')
            USING ERRCODE = 'PC071',
                  DETAIL = json_build_object('agent', p_agent, 'depth', v_parent.subagent_depth + 1,
                                             'limit', p_max_depth)::text;
    END IF;
    v_requested := CASE WHEN p_budget_usd IS NULL THEN NULL
                        ELSE pgcrew.money_amount(p_budget_usd, 'sub-agent budget_usd') END;
    IF v_parent.budget_usd_limit IS NOT NULL THEN
        v_remaining := greatest(v_parent.budget_usd_limit - v_parent.budget_spent_usd
                                - v_parent.budget_reserved_usd, 0);
        v_carve := coalesce(v_requested, v_remaining);
        IF v_carve > v_remaining OR v_carve = 0 THEN
            RAISE EXCEPTION 'run %: its remaining budget of % USD cannot cover sub-agent % (% USD)',
                p_parent, v_remaining, p_agent, v_carve
                USING ERRCODE = 'PC072',
                      DETAIL = json_build_object(
                          'limit_usd', v_parent.budget_usd_limit::float8,
                          'spent_usd', v_parent.budget_spent_usd::float8,
                          'reserved_usd', v_parent.budget_reserved_usd::float8,
                          'requested_usd', v_carve::float8)::text;
        END IF;
    ELSE
        v_carve := v_requested;
    END IF;
    IF v_carve IS NOT NULL THEN
        UPDATE pgcrew.runs SET budget_reserved_usd = budget_reserved_usd + v_carve
         WHERE id = p_parent;
    END IF;
    v_id := gen_random_uuid();
    INSERT INTO pgcrew.runs (id, tenant_id, session_id, agent_name, prompt, parent_run_id,
                             parent_relation, parent_step_key, carved_budget_usd,
                             budget_usd_limit, subagent_depth)
    VALUES (v_id, v_parent.tenant_id, v_parent.session_id, p_agent, p_prompt, p_parent,
            'subagent', p_step_key, v_carve, v_carve, v_parent.subagent_depth + 1);
    PERFORM pgcrew.append_events(v_id, NULL, ARRAY['run_created'], ARRAY[NULL::text],
        ARRAY[jsonb_build_object('state', 'pending', 'agent_name', p_agent,
                                 'session_id', v_parent.session_id, 'parent_run_id', p_parent,
                                 'parent_relation', 'subagent', 'parent_step_key', p_step_key,
                                 'budget_usd', v_carve::float8,
                                 'depth', v_parent.subagent_depth + 1)],
        ARRAY[false]);
    child_id := v_id;
    created := true;
    budget_usd := v_carve::float8;
    depth := v_parent.subagent_depth + 1;
    RETURN NEXT;
END $$;

-- A finished child returns its carve to its parent: the parent's reservation drops by the carve
-- and its spend grows by what the child spent. NEW is the row as the transition wrote it: spend
-- added to the child after that (in this transaction too, by its own children's cascade) is
-- passed up by runs_subagent_late_spend, so each amount reaches the parent once.
CREATE FUNCTION pgcrew.return_subagent_budget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgcrew.runs p
       SET budget_reserved_usd = greatest(p.budget_reserved_usd - coalesce(NEW.carved_budget_usd, 0), 0),
           budget_spent_usd = p.budget_spent_usd + NEW.budget_spent_usd
     WHERE p.id = NEW.parent_run_id;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgcrew.return_subagent_budget() FROM PUBLIC;

CREATE TRIGGER runs_subagent_finished AFTER UPDATE OF state ON pgcrew.runs
    FOR EACH ROW
    WHEN (NEW.parent_relation = 'subagent'
          AND NEW.state IN ('completed', 'failed', 'cancelled')
          AND OLD.state IN ('pending', 'running', 'waiting'))
    EXECUTE FUNCTION pgcrew.return_subagent_budget();

-- Spend settled on a child after it finished (a call in flight when it was cancelled) is passed
-- up to its parent (and on up, through this same trigger, while the parents are finished too).
CREATE FUNCTION pgcrew.pass_up_subagent_spend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgcrew.runs p
       SET budget_spent_usd = p.budget_spent_usd + (NEW.budget_spent_usd - OLD.budget_spent_usd)
     WHERE p.id = NEW.parent_run_id;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgcrew.pass_up_subagent_spend() FROM PUBLIC;

CREATE TRIGGER runs_subagent_late_spend AFTER UPDATE OF budget_spent_usd ON pgcrew.runs
    FOR EACH ROW
    WHEN (NEW.parent_relation = 'subagent'
          AND OLD.state IN ('completed', 'failed', 'cancelled')
          AND NEW.budget_spent_usd > OLD.budget_spent_usd)
    EXECUTE FUNCTION pgcrew.pass_up_subagent_spend();

-- A parent that is cancelled or fails cancels its unfinished sub-agent runs, each recording
-- `run_cancelled` (with `cascaded` and the parent) in its own ledger; their own children follow
-- through this same trigger.
CREATE FUNCTION pgcrew.cancel_subagents() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    c        record;
    v_state  text;
    v_reason text := format('parent run %s was %s', NEW.id, NEW.state);
BEGIN
    FOR c IN SELECT r.id, r.state FROM pgcrew.runs r
              WHERE r.parent_run_id = NEW.id AND r.parent_relation = 'subagent'
                AND r.state IN ('pending', 'running', 'waiting')
              ORDER BY r.created_at, r.id
    LOOP
        -- The child's ledger lock first (the order of appends and transitions), then its state
        -- again: a child that finished meanwhile is left as it is.
        PERFORM pg_advisory_xact_lock(r.lock_key) FROM pgcrew.runs r WHERE r.id = c.id;
        SELECT r.state INTO v_state FROM pgcrew.runs r WHERE r.id = c.id;
        CONTINUE WHEN v_state NOT IN ('pending', 'running', 'waiting');
        PERFORM pgcrew.append_events(c.id, NULL, ARRAY['run_cancelled'], ARRAY[NULL::text],
            ARRAY[jsonb_build_object('reason', v_reason, 'from', v_state, 'to', 'cancelled',
                                     'cascaded', true, 'parent_run_id', NEW.id)],
            ARRAY[false]);
        UPDATE pgcrew.runs
           SET state = 'cancelled', cancel_reason = v_reason, stop_reason = 'cancelled',
               cancel_requested_at = now(), finalized_at = now(), lease_owner = NULL,
               lease_expires_at = NULL, updated_at = now()
         WHERE id = c.id;
    END LOOP;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgcrew.cancel_subagents() FROM PUBLIC;

CREATE TRIGGER runs_cancel_subagents AFTER UPDATE OF state ON pgcrew.runs
    FOR EACH ROW
    WHEN (NEW.state IN ('cancelled', 'failed') AND OLD.state IN ('pending', 'running', 'waiting'))
    EXECUTE FUNCTION pgcrew.cancel_subagents();

REVOKE ALL ON FUNCTION pgcrew.subagent_cycle(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.set_subagents(text, text[], float8[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcrew.start_child_run(uuid, text, text, text, float8, integer) FROM PUBLIC;
