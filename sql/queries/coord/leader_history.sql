-- The newest $1 leader terms of every lease (pgcrew.leader_history), newest first.
SELECT name, term, leader_id, acquired_at, held_until
  FROM pgcrew.leader_history
 ORDER BY acquired_at DESC, term DESC
 LIMIT $1
