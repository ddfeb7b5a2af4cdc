-- pgcrew V014: per-agent policy for a capability denial inside an agent run (issue #15).
--
-- `fail_run` (the default): the run fails with error_type `capability_denied` (the tenant gets
-- `Error::CapabilityDenied`, as the README promises). `return_to_model`: the denial is returned to
-- the model as the tool's result and the run continues. Either way the ledger records
-- `capability_denied` and the tool does not run. Every instance re-registers its agents at start,
-- so existing rows take the policy of their definition at the next registration.
ALTER TABLE pgcrew.agents
    ADD COLUMN on_capability_denied text NOT NULL DEFAULT 'fail_run'
        CONSTRAINT agents_on_capability_denied_check
        CHECK (on_capability_denied IN ('fail_run', 'return_to_model'));
