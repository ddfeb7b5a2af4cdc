DELETE FROM pgcrew.instances WHERE id = $1
