-- pgcrew V034: degradation decisions among the tenant page's budget decisions (issue #19).
--
-- The kernel now applies a tenant's degradation policy to its model steps and records each
-- decision that changed a step as a `budget_degraded` ledger event (status, rules applied,
-- requested and used model and max_tokens, reason). The console lists them beside
-- budget_exceeded and budget_overrun (sql/queries/ui/tenant_decisions.sql), so the partial
-- index of V030 is replaced by one whose predicate includes the new event type; other appends
-- still do not write it.

DROP INDEX pgcrew.events_budget_decisions_idx;

CREATE INDEX events_budget_decisions_idx ON pgcrew.events (tenant_id, created_at)
    WHERE event_type IN ('budget_exceeded', 'budget_overrun', 'budget_degraded');
