SELECT pgcrew.delete_tenant($1)
