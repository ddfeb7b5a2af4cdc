SELECT r.id, r.state, t.queue, t.kind
  FROM pgcrew.rescue_tasks($1, $2) r
  JOIN pgcrew.tasks t ON t.id = r.id
