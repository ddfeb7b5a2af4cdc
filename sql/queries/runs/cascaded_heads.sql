-- The finished sub-agent runs below $1 (children, grandchildren, ...) whose final head has no
-- checkpoint: those V021's runs_cancel_subagents just cancelled with $1 (in SQL, without the
-- ledger key). The caller signs them with the key, as it signs $1's head.
WITH RECURSIVE d(id) AS (
    SELECT r.id FROM pgcrew.runs r WHERE r.parent_run_id = $1 AND r.parent_relation = 'subagent'
    UNION ALL
    SELECT r.id FROM pgcrew.runs r JOIN d ON r.parent_run_id = d.id
     WHERE r.parent_relation = 'subagent'
)
SELECT r.id, r.ledger_head_seq, r.ledger_head_hash
  FROM d JOIN pgcrew.runs r ON r.id = d.id
 WHERE r.state IN ('completed', 'failed', 'cancelled')
   AND r.ledger_head_hash IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM pgcrew.ledger_checkpoints c
                    WHERE c.run_id = r.id AND c.seq = r.ledger_head_seq)
