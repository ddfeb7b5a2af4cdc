UPDATE pgcrew.ledger_checkpoints SET mac = $3 WHERE run_id = $1 AND seq = $2
