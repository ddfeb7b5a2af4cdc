SELECT id, queue, kind, tenant_id, run_id, priority, payload, attempts, max_attempts, claim_token, run_at, created_at, lag_us FROM pgcrew.claim_tasks($1, $2, $3)
