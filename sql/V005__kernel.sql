-- pgcrew kernel: agent and tool definitions (upserted by instances), and an index that finds a
-- run's step events by step key (replay looks steps up by (run_id, step_key)).

CREATE TABLE pgcrew.agents (
    name          text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    description   text NOT NULL DEFAULT '',
    model         text NOT NULL,
    system_prompt text NOT NULL DEFAULT '',
    tools         text[] NOT NULL DEFAULT '{}',
    max_tokens    integer CHECK (max_tokens IS NULL OR max_tokens > 0),
    temperature   double precision CHECK (temperature IS NULL OR temperature BETWEEN 0 AND 2),
    max_iterations integer NOT NULL DEFAULT 10 CHECK (max_iterations > 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgcrew.tools (
    name                text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    description         text NOT NULL DEFAULT '',
    input_schema        jsonb NOT NULL,
    requires_capability text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_step_key_idx ON pgcrew.events (run_id, step_key, seq)
    WHERE step_key IS NOT NULL;
