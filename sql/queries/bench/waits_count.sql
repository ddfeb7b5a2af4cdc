-- `pgcrew bench waits`: runs of tenant $1 in state $2.
SELECT count(*) FROM pgcrew.runs WHERE tenant_id = $1::text AND state = $2::text
