SELECT count(*) FROM pgcrew.instances
