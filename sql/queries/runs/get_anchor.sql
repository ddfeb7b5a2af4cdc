SELECT last_seq, last_hash, event_count, reason, purged_at FROM pgcrew.chain_anchors WHERE run_id = $1
