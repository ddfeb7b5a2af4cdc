SELECT to_regclass('pgcrew.installation_secret') IS NOT NULL
