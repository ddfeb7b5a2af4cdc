-- The recorded ledger head of a run (0/NULL when nothing was appended), its state and ledger
-- format (1 or 2).
SELECT r.ledger_head_seq, r.ledger_head_hash, r.state, r.ledger_format
FROM pgcrew.runs r WHERE r.id = $1
