SELECT capabilities FROM pgcrew.tenants WHERE id = $1
