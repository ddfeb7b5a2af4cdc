-- A run's signed checkpoints, in seq order.
SELECT seq, head_hash, mac FROM pgcrew.ledger_checkpoints WHERE run_id = $1 ORDER BY seq
