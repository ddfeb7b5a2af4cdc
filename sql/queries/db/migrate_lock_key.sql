-- The migrators' advisory-lock key, derived with the installation secret (V008).
SELECT pgcrew.lock_key('migrate', 'pgcrew')
