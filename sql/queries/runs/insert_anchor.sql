-- Keep a chain anchor (last seq and hash) for a run whose events retention removes.
INSERT INTO pgcrew.chain_anchors (run_id, tenant_id, last_seq, last_hash, event_count, reason)
SELECT $1, $2, e.seq, e.hash, (SELECT count(*) FROM pgcrew.events c WHERE c.run_id = $1), $3
FROM pgcrew.events e
WHERE e.run_id = $1
ORDER BY e.seq DESC
LIMIT 1
RETURNING last_seq, event_count
