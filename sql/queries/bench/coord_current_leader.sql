SELECT leader_id, term FROM pgcrew.leader WHERE name = 'default' AND expires_at > now()
