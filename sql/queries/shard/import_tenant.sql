SELECT pgcrew.import_tenant($1)
