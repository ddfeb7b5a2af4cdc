-- pgcrew doctor: runs finished within the last $1 microseconds (newest first, at most $2), each
-- with the signed checkpoint covering its recorded ledger head, if any.
SELECT r.id,
       r.state,
       r.ledger_head_seq,
       r.ledger_head_hash,
       c.mac,
       count(*) OVER () AS sampled
  FROM (SELECT x.id, x.state, x.ledger_head_seq, x.ledger_head_hash, x.finalized_at
          FROM pgcrew.runs x
         WHERE x.finalized_at > now() - make_interval(secs => $1::int8 / 1e6)
           AND x.state IN ('completed', 'failed', 'cancelled')
           AND x.ledger_head_seq > 0
         ORDER BY x.finalized_at DESC
         LIMIT $2) r
  LEFT JOIN pgcrew.ledger_checkpoints c ON c.run_id = r.id AND c.seq = r.ledger_head_seq
 ORDER BY r.finalized_at DESC, r.id
