-- The recorded ledger head of a run (0/NULL when nothing was appended), and whether its events
-- were purged (then the chain anchor stands in for them).
SELECT r.ledger_head_seq, r.ledger_head_hash,
       EXISTS (SELECT 1 FROM pgcrew.chain_anchors a WHERE a.run_id = r.id) AS purged
FROM pgcrew.runs r WHERE r.id = $1
