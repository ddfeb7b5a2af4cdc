-- Delete fire records older than $1 µs (at most $2): a fire that old cannot come due again.
DELETE FROM pgcrew.schedule_fires
 WHERE ctid = ANY (ARRAY(SELECT f.ctid FROM pgcrew.schedule_fires f
                          WHERE f.created_at < now() - $1::bigint * interval '1 microsecond'
                          ORDER BY f.created_at LIMIT $2))
