-- pgcrew core schema: instances, leader lease, tenants, sessions, runs and their notifications.
-- Later migrations add the ledger, the task queue, tenancy accounting and the kernel.

CREATE SCHEMA IF NOT EXISTS pgcrew;

-- ---------------------------------------------------------------------------------------------
-- Instances
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.instances (
    id                text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    hostname          text NOT NULL,
    pid               integer NOT NULL,
    version           text NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX instances_heartbeat_idx ON pgcrew.instances (last_heartbeat_at);

CREATE TABLE pgcrew.instance_agents (
    instance_id text NOT NULL REFERENCES pgcrew.instances (id) ON DELETE CASCADE,
    agent_name  text NOT NULL,
    PRIMARY KEY (instance_id, agent_name)
);
CREATE INDEX instance_agents_agent_idx ON pgcrew.instance_agents (agent_name);

CREATE TABLE pgcrew.instance_tools (
    instance_id text NOT NULL REFERENCES pgcrew.instances (id) ON DELETE CASCADE,
    tool_name   text NOT NULL,
    PRIMARY KEY (instance_id, tool_name)
);
CREATE INDEX instance_tools_tool_idx ON pgcrew.instance_tools (tool_name);

CREATE FUNCTION pgcrew.notify_instance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('pgcrew_instance_deregistered', json_build_object('instance_id', OLD.id)::text);
    ELSE
        PERFORM pg_notify('pgcrew_instance_registered', json_build_object('instance_id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$;

-- Registration re-sets created_at (also on re-registration of the same id); heartbeats do not.
CREATE TRIGGER instances_registered AFTER INSERT OR UPDATE OF created_at ON pgcrew.instances
    FOR EACH ROW EXECUTE FUNCTION pgcrew.notify_instance();
CREATE TRIGGER instances_deregistered AFTER DELETE ON pgcrew.instances
    FOR EACH ROW EXECUTE FUNCTION pgcrew.notify_instance();

-- ---------------------------------------------------------------------------------------------
-- Leader lease. `term` comes from a sequence so it strictly increases across resignations.
-- ---------------------------------------------------------------------------------------------
CREATE SEQUENCE pgcrew.leader_term_seq AS bigint;

CREATE TABLE pgcrew.leader (
    name       text PRIMARY KEY,
    leader_id  text NOT NULL,
    term       bigint NOT NULL,
    elected_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE FUNCTION pgcrew.notify_leader() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('pgcrew_leader_changed',
            json_build_object('name', OLD.name, 'leader_id', NULL, 'term', OLD.term)::text);
    ELSE
        PERFORM pg_notify('pgcrew_leader_changed',
            json_build_object('name', NEW.name, 'leader_id', NEW.leader_id, 'term', NEW.term)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER leader_inserted AFTER INSERT OR DELETE ON pgcrew.leader
    FOR EACH ROW EXECUTE FUNCTION pgcrew.notify_leader();
CREATE TRIGGER leader_term_changed AFTER UPDATE ON pgcrew.leader
    FOR EACH ROW WHEN (OLD.term IS DISTINCT FROM NEW.term) EXECUTE FUNCTION pgcrew.notify_leader();

-- ---------------------------------------------------------------------------------------------
-- Tenants (budget accounting columns are maintained by the tenancy module).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.tenants (
    id                   text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    capabilities         text[] NOT NULL DEFAULT '{}',
    budget_usd_limit     numeric(20, 10) CHECK (budget_usd_limit IS NULL OR budget_usd_limit >= 0),
    spent_usd            numeric(20, 10) NOT NULL DEFAULT 0 CHECK (spent_usd >= 0),
    reserved_usd         numeric(20, 10) NOT NULL DEFAULT 0 CHECK (reserved_usd >= 0),
    max_concurrent_runs  integer CHECK (max_concurrent_runs IS NULL OR max_concurrent_runs > 0),
    max_concurrent_tasks integer CHECK (max_concurrent_tasks IS NULL OR max_concurrent_tasks > 0),
    metadata             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Work that names no tenant belongs to `default`.
INSERT INTO pgcrew.tenants (id) VALUES ('default');

-- ---------------------------------------------------------------------------------------------
-- Sessions and runs
-- ---------------------------------------------------------------------------------------------
CREATE TABLE pgcrew.sessions (
    id         uuid PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES pgcrew.tenants (id),
    identifier text NOT NULL,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, identifier)
);

CREATE TABLE pgcrew.runs (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES pgcrew.tenants (id),
    session_id       uuid REFERENCES pgcrew.sessions (id),
    agent_name       text,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    prompt           text,
    response_text    text,
    stop_reason      text,
    input_tokens     bigint NOT NULL DEFAULT 0,
    output_tokens    bigint NOT NULL DEFAULT 0,
    cost_usd         numeric(20, 10) NOT NULL DEFAULT 0,
    error_message    text,
    error_type       text,
    instance_id      text,
    lease_owner      text,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    parent_run_id    uuid REFERENCES pgcrew.runs (id),
    forked_at_seq    bigint,
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    cancel_requested_at timestamptz,
    cancel_reason    text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finalized_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_active_idx ON pgcrew.runs (state, started_at) WHERE state IN ('pending', 'running');
CREATE INDEX runs_tenant_idx ON pgcrew.runs (tenant_id, created_at DESC);
CREATE INDEX runs_session_idx ON pgcrew.runs (session_id) WHERE session_id IS NOT NULL;
CREATE INDEX runs_lease_owner_idx ON pgcrew.runs (lease_owner) WHERE lease_owner IS NOT NULL;

-- The run state machine, enforced in the database too: terminal states are final.
CREATE FUNCTION pgcrew.check_run_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state = NEW.state THEN
        RETURN NEW;
    END IF;
    IF (OLD.state = 'pending' AND NEW.state IN ('running', 'failed', 'cancelled'))
       OR (OLD.state = 'running' AND NEW.state IN ('completed', 'failed', 'cancelled')) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'illegal run state transition for %: % -> %', OLD.id, OLD.state, NEW.state
        USING ERRCODE = 'check_violation', HINT = 'pgcrew_illegal_transition';
END $$;

CREATE TRIGGER runs_check_transition BEFORE UPDATE OF state ON pgcrew.runs
    FOR EACH ROW EXECUTE FUNCTION pgcrew.check_run_transition();

CREATE FUNCTION pgcrew.notify_run_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcrew_run_state_changed', json_build_object(
        'run_id', NEW.id,
        'tenant_id', NEW.tenant_id,
        'from', CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END,
        'to', NEW.state)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER runs_state_inserted AFTER INSERT ON pgcrew.runs
    FOR EACH ROW EXECUTE FUNCTION pgcrew.notify_run_state();
CREATE TRIGGER runs_state_changed AFTER UPDATE OF state ON pgcrew.runs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION pgcrew.notify_run_state();

-- ---------------------------------------------------------------------------------------------
-- Troubleshooting views (thresholds are the client defaults; filter on the age columns for others)
-- ---------------------------------------------------------------------------------------------
CREATE VIEW pgcrew.stale_instances AS
SELECT i.id,
       i.hostname,
       i.pid,
       i.version,
       i.last_heartbeat_at,
       now() - i.last_heartbeat_at AS silent_for,
       (SELECT l.name FROM pgcrew.leader l WHERE l.leader_id = i.id LIMIT 1) AS leader_of
FROM pgcrew.instances i
WHERE i.last_heartbeat_at < now() - interval '2 minutes';

CREATE VIEW pgcrew.stuck_runs AS
SELECT r.id AS run_id,
       r.tenant_id,
       r.agent_name,
       r.state,
       r.instance_id,
       r.lease_owner,
       r.lease_expires_at,
       r.started_at,
       now() - coalesce(r.started_at, r.created_at) AS age,
       CASE
           WHEN r.state = 'running' AND r.started_at < now() - interval '1 hour' THEN 'running longer than 1 hour'
           WHEN r.state = 'running' AND r.lease_expires_at < now() THEN 'run lease expired'
           WHEN r.state = 'running' AND r.instance_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id) THEN 'instance gone'
           ELSE 'pending longer than 1 hour'
       END AS reason
FROM pgcrew.runs r
WHERE (r.state = 'running' AND (r.started_at < now() - interval '1 hour'
                                OR r.lease_expires_at < now()
                                OR (r.instance_id IS NOT NULL
                                    AND NOT EXISTS (SELECT 1 FROM pgcrew.instances i WHERE i.id = r.instance_id))))
   OR (r.state = 'pending' AND r.created_at < now() - interval '1 hour');
