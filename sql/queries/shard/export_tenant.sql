SELECT pgcrew.export_tenant($1)
