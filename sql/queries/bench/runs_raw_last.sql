-- Benchmark baseline (plain SQL): the last (seq, hash) of a run.
SELECT seq, hash FROM pgcrew.events WHERE run_id = $1 ORDER BY seq DESC LIMIT 1
