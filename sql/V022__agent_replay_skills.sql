-- pgcrew V022 (issue #18, items 6 and 8): per-agent replay policy, progressive skills.
--
-- replay_policy: what an agent run does when a recorded model step is replayed with a request
-- that differs from the recorded one (say, the system prompt changed between a crash and the
-- resume): `strict` (the default: the run fails with error_type replay_consistency),
-- `allow_prompt_drift` (the recorded answer stands, `replayed_with_drift` is recorded) or
-- `fork_on_drift` (the run continues in a fork that carries the steps before the drift).
ALTER TABLE pgcrew.agents
    ADD COLUMN replay_policy text NOT NULL DEFAULT 'strict'
        CONSTRAINT agents_replay_policy_check
        CHECK (replay_policy IN ('strict', 'allow_prompt_drift', 'fork_on_drift')),
    -- The skills an agent may load with its built-in load_skill tool.
    ADD COLUMN skills text[] NOT NULL DEFAULT '{}';

-- Forks of a run at a sequence number (ForkOnDrift continues an existing fork instead of
-- making a second one).
CREATE INDEX runs_forks_idx ON pgcrew.runs (parent_run_id, forked_at_seq)
    WHERE forked_at_seq IS NOT NULL;

-- Skills: named bundles of tools and instructions, upserted by instances like agents and
-- tools. Every tool a skill names must be a registered tool (checked at registration).
CREATE TABLE pgcrew.skills (
    name         text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    description  text NOT NULL DEFAULT '',
    instructions text NOT NULL DEFAULT '',
    tools        text[] NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Live model output (issue #18, item 7): streamed deltas of a run go out as NOTIFY on a
-- channel of its own, never into the ledger. Any role may LISTEN on any channel, so the
-- channel's name is derived with the installation secret, which only the owner can read:
-- another tenant's role cannot learn the name of a run's channel (payloads carry the deltas,
-- so the name is what keeps them private).
CREATE FUNCTION pgcrew.run_output_channel(p_run uuid) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    v_secret bytea;
BEGIN
    SELECT s.secret INTO STRICT v_secret FROM pgcrew.installation_secret s;
    RETURN 'pgcrew_run_output_'
        || encode(substr(sha256(v_secret || convert_to('run_output', 'UTF8') || '\x00'::bytea
                                || convert_to(p_run::text, 'UTF8')), 1, 16), 'hex');
END $$;
REVOKE ALL ON FUNCTION pgcrew.run_output_channel(uuid) FROM PUBLIC;
