DELETE FROM pgcrew.leader WHERE name <> $1 AND expires_at < now()
