-- `pgcrew bench queue`, raw claim+complete limit: claim a batch of $1 rows by
-- UPDATE ... FOR UPDATE SKIP LOCKED.
WITH next AS (SELECT id FROM bench_raw_cc WHERE state = 'available'
               ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE bench_raw_cc SET state = 'running', claimed_at = now()
  FROM next WHERE bench_raw_cc.id = next.id
RETURNING bench_raw_cc.id, bench_raw_cc.payload
